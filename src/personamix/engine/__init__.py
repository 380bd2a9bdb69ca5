"""The engine: the math of targets, the sampling settings, the samplers and the session they run
in. It reaches models only through the Backend contract (session.py) and imports nothing from
backends/ or the applications."""
