"""sglang_mmpre: tokenizer-stage multimodal materialization for sglang 0.5.5.

The TokenizerManager materializes ``MultimodalInputs`` (what sglang's
``MultimodalInputs.from_dict`` builds, hashes included) off its event loop; feature
tensors reach every scheduler rank through POSIX shared memory, so the scheduler runs
no ``from_dict`` and no collective for multimodal inputs.

Where a request's tensors are at each step:

- ``tokenizer_side``: materialize and hash, write the segment, count consumers per send;
- ``transport``: the segment (byte layout, lifetime protocol), descriptors, sweep;
- ``scheduler_side``: map the segment, rebuild ``MultimodalInputs``, drop the reference;
- ``patching``: the CLI that applies ``patches/*.patch`` to an installed sglang 0.5.5.
"""

__version__ = "0.1.0"
