"""One module per stage: ``run(params, logger) -> dict``; the CLI, DVC and Prefect call them
through :func:`pilamim.stages.runner.execute`, which adds MLflow tracking.

Each stage module also says which files it needs (``inputs``: path -> stage that makes it),
so running a stage too early names the stage to run first, before anything is started.
"""

STAGES = ("fetch", "prepare", "pretrain", "probe", "finetune", "register")

# Which params groups each stage reads (its MLflow params, its DVC ``params:``).
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "fetch": ("data",),
    "prepare": ("data", "model"),  # model: only img_size (statistics at the input size)
    "pretrain": ("model", "pretrain"),
    "probe": ("probe",),
    "finetune": ("finetune",),
    "register": ("register",),
}
