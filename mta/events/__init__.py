"""Message events: the events store (mta.events.store) and the pipeline that fills it."""
