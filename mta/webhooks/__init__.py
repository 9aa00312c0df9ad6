"""The webhooks role: pushes event batches from the events store to webhook targets."""
