"""Evaluation: the tasks' data (tasks.py), the methods compared and how they answer (methods.py),
what is measured (metrics.py), the offline judges (judges.py), runs that resume (runner.py),
Markdown tables (report.py) and the speed benchmark (bench.py)."""
