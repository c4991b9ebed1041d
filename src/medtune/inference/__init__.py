"""Inference backends behind one small interface, batch prediction, and (later) chat and serving."""
