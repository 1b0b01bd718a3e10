"""The lowest layer, needing nothing else of cyclereg: the coordinate convention (:mod:`.coords`), transforms
and warping (:mod:`.transforms`), Jacobians, folds and other measures of a map (:mod:`.metrics`,
:mod:`.label_metrics`), separable filters, configs and their validation (:mod:`.config`), errors, atomic
writes and the distributed context."""
