"""``ssl-eval suite``: the embedded main job. A job suite (YAML in ``protocols/jobs/``) names
the models to train with the bundled trainer, the baselines, the protocols and the budget;
``run_suite`` trains what is not trained yet, evaluates everything through the one
orchestrator (``ssl_eval.orchestrate.evaluate.run``), writes the leaderboard and the report, and checks the
numbers against the committed reference."""

from .spec import JobSuite, load_job_suite, shipped_job_suites

__all__ = ["JobSuite", "load_job_suite", "shipped_job_suites"]
