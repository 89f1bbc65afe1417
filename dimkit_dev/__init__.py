"""Developer tools of dimkit, apart from the runtime package: they build what the kit ships or tests with.

- :mod:`dimkit_dev.sample` regenerates the bundled synthetic sample (``make sample``);
- :mod:`dimkit_dev.clip_train` trains the small CLIP shipped beside it (``make sample-clip``);
- :mod:`dimkit_dev.synthetic` makes in-memory MEL problems for tests and benchmarks of the trainer;
- :mod:`dimkit_dev.like` builds a synthetic dataset of a real one's shape and size (the rehearsal);
- :mod:`dimkit_dev.tiny_blip2` builds random BLIP-2 models from configs (tests, benchmarks, rehearsal).

Nothing in ``dimkit`` imports them.
"""
