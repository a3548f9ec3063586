"""Planning and profiling: which techniques to combine on given hardware.

``workload`` names what is planned (a model, a batch, lengths) and one candidate setting;
``targets`` holds the hardware tables; ``memory`` and ``step_time`` are the analytic
models (no compiles); ``candidates`` enumerates and ranks; ``verify`` compiles the best
ahead of time for the target; ``profile`` measures a real run.
"""
