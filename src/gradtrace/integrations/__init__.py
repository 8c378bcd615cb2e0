"""Optional bridges to other tools. Each module imports its extra only when imported.

* :mod:`gradtrace.integrations.lightning` -- ``GradTraceCallback`` for Lightning (``pip install gradtrace[lightning]``)
* :mod:`gradtrace.integrations.hf` -- ``GradTraceCallback`` for the Transformers ``Trainer`` (``pip install gradtrace[hf]``)
* :mod:`gradtrace.integrations.tensorboard` -- ``TensorBoardSink`` (``pip install gradtrace[tensorboard]``)
* :mod:`gradtrace.integrations.wandb` -- ``WandbSink`` (``pip install gradtrace[wandb]``)
* :mod:`gradtrace.integrations.csv` -- ``CSVSink``, long format (no extra needed)

A sink is any object with ``start(meta)``, ``write(record)`` and ``close()``; pass it as
``gt.watch(model, opt, sinks=[...])``. Only rank 0 feeds sinks in a distributed run.

Example:
    >>> from gradtrace.integrations.csv import CSVSink
    >>> with gt.watch(model, optimizer, sinks=[CSVSink("stats.csv")]) as mon:
    ...     loss_fn(model(x), y).backward()
    ...     optimizer.step()
    >>> open("stats.csv").readline().strip()
    'step,stat,name,value'
"""
