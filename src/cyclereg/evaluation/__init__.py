"""Scoring models: per-pair scores and their summary (:mod:`.scores`), on datasets (:mod:`.datasets`) and on
the pairs of a CSV in physical space (:mod:`.files`). The keys and their units: ``docs/metrics.md``."""
