"""The deployment definitions: prefect.yaml and flows/deploy.py describe the same deployment,
name an entrypoint that loads, and deploy to a process work pool on a real Prefect server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pilamim_flows import deploy
from pilamim_flows.pipeline import FLOW_NAME
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.flows import load_flow_from_entrypoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_prefect_yaml_is_valid_for_prefect_deploy(prefect_yaml):
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` parses

    model = PrefectYamlModel.model_validate(prefect_yaml)
    dep, gpu = model.deployments
    assert gpu.name == "pretrain-gpu" and gpu.work_pool.name == "pilamim-gpu"
    assert gpu.entrypoint == "flows/torchrun_job.py:pretrain_distributed"
    assert not gpu.schedules
    assert dep.name == deploy.DEPLOYMENT_NAME
    assert dep.work_pool.name == deploy.WORK_POOL
    assert dep.entrypoint == deploy.ENTRYPOINT
    [schedule] = dep.schedules
    assert schedule.cron == deploy.CRON and schedule.timezone == deploy.TIMEZONE
    assert dep.concurrency_limit.limit == 1


def test_entrypoint_loads_the_flow_from_the_file(monkeypatch):
    monkeypatch.chdir(REPO)
    flow = load_flow_from_entrypoint(deploy.ENTRYPOINT)
    assert flow.name == FLOW_NAME
    gpu = load_flow_from_entrypoint("flows/torchrun_job.py:pretrain_distributed")
    assert gpu.name == "pilamim-pretrain-distributed"
    assert set(gpu.parameters.properties) >= {"nproc_per_node", "nnodes", "rdzv_endpoint"}


def test_deploy_to_a_process_work_pool(prefect_harness):
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=deploy.WORK_POOL, type="process"))
        deployment_id = deploy.deploy()
        dep = client.read_deployment(deployment_id)
    assert dep.name == deploy.DEPLOYMENT_NAME and dep.work_pool_name == deploy.WORK_POOL
    assert dep.entrypoint == deploy.ENTRYPOINT
    assert Path(dep.path or ".").resolve() == REPO or REPO.as_posix() in str(dep.pull_steps)
    [schedule] = dep.schedules
    assert schedule.schedule.cron == deploy.CRON and schedule.active
    assert dep.global_concurrency_limit.limit == 1
    assert "Params" in str(dep.parameter_openapi_schema)
