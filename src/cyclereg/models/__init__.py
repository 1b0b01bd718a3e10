"""Networks (:mod:`.networks`; a new architecture goes there, with its name in ``NETWORKS``), registration
models built of them (:mod:`.registration`), the methods' training losses (:mod:`.methods`; a new method goes
there), patch-wise inference and training (:mod:`.multiscale`), and model files (:mod:`.modelfile`)."""
