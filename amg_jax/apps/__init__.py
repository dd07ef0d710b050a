"""The application layer: the commands (demo, eval, sample, sweep, bench, cli) as thin views over
one pipeline: a model is a ``ModelSpec`` (``apps.models``) and one run of one method is
``apps.runs.run_method``. Nothing below this package imports it."""
