"""Serving: an embeddable, thread-safe generation engine and an HTTP front end for it.

    from runtime.serving import Engine, EngineConfig
    with Engine.open("bundles/tiny", config=EngineConfig(workers=2)) as engine:
        engine.start()                       # warm-up, then worker threads
        result = engine.generate(options, timeout=60)

`runtime.serving.app.create_app(engine)` builds the FastAPI app; `python -m runtime.serve` runs it.
The HTTP modules import FastAPI; this package's engine needs only the runtime's own dependencies.
"""

from runtime.serving.engine import DeadlineExceeded, Engine, EngineClosed, EngineConfig, Job, QueueFull
from runtime.serving.limits import Limits

__all__ = ["DeadlineExceeded", "Engine", "EngineClosed", "EngineConfig", "Job", "Limits", "QueueFull"]
