"""Scheduler side: map a request's segment, rebuild its ``MultimodalInputs``, drop the
reference. ``hooks.take_multimodal_inputs`` is what the patched Scheduler calls."""
