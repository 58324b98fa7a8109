"""Applications built on the library, not part of it: the ``lalora`` command (``cli``), its demo
(``demo``, ``demo_tasks``, ``demo_files``) and cost benchmark (``bench``), and the config-built tiny
models they run on (``tiny``). The core package imports none of these."""
