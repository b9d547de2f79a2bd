"""One module per stage: ``run(params) -> dict``. The CLI, DVC and Prefect all call these."""

STAGES = ("prepare", "pretrain", "probe", "finetune")

# Which params groups each stage reads (its MLflow params, its DVC ``params:``).
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "prepare": ("data",),
    "pretrain": ("model", "pretrain"),
    "probe": ("probe",),
    "finetune": ("finetune",),
}
