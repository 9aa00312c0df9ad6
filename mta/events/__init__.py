"""The events role: SparkPost-shaped message events from the spool's durable records.

:mod:`mta.events.main` is the process; :mod:`mta.events.shape` the event shape.
"""
