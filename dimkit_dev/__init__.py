"""Developer tools of dimkit, apart from the runtime package: they build what the kit ships or tests with.

- :mod:`dimkit_dev.sample` regenerates the bundled synthetic sample (``make sample``);
- :mod:`dimkit_dev.clip_train` trains the small CLIP shipped beside it (``make sample-clip``);
- :mod:`dimkit_dev.synthetic` makes in-memory MEL problems for tests and benchmarks of the trainer.

Nothing in ``dimkit`` imports them.
"""
