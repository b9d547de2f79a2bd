"""The MLflow Model Registry: versions, aliases and tags (:mod:`.store`), the pure promotion
gate (:mod:`.promotion`), logging the encoder as MLflow models (:mod:`.model_logging`) and the
pyfunc embedder over raw images (:mod:`.embedder`).

Same layer as :mod:`pilamim.tracking`; the register stage (:mod:`pilamim.stages.register`)
drives it.
"""
