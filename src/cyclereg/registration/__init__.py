"""Registering pairs with a trained model: files in, a map in physical space, files out (:mod:`.register`);
instance optimisation (:mod:`.instance`, :mod:`.refine`, settings in :mod:`.tuning`); direct optimisation
without a network (:mod:`.optimize`)."""
