"""The orchestrator's own stack (deploy/cloudformation/orchestrator.yaml), its image and its
dagster.yaml: cfn-lint clean, the database private and encrypted with its password only in
Secrets Manager, the UI reachable from one range, runs launched by dagster-aws's EcsRunLauncher
from this stack's run task definition; and the instance file valid and working on PostgreSQL."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import dagster as dg
import pytest
from cfnlint.decode import decode

from tests.deploy.test_deploy import (
    as_list,
    cfn_lint_command,
    environment,
    is_ref,
    one,
    parse_dockerfile,
    resources,
    statements,
)

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "deploy" / "cloudformation" / "orchestrator.yaml"
IMAGE = ROOT / "deploy" / "docker" / "orchestrator.Dockerfile"
INSTANCE_YAML = ROOT / "deploy" / "dagster" / "dagster.yaml"
ALL_CONDITIONS = frozenset({"HasTrainingSubnets", "HasTrainingSecurityGroups"})


@pytest.fixture(scope="module")
def stack() -> dict:
    tpl, matches = decode(str(STACK))
    assert not matches, matches
    return tpl


def test_cfn_lint_is_clean():
    proc = subprocess.run(
        [*cfn_lint_command(), str(STACK)], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_the_database_is_private_encrypted_and_its_password_only_in_secrets_manager(stack):
    _, db = one(stack, "AWS::RDS::DBInstance")
    p = db["Properties"]
    assert p["Engine"] == "postgres" and p["StorageEncrypted"] is True
    assert p["PubliclyAccessible"] is False and p["DeletionProtection"] is True
    assert db["DeletionPolicy"] == db["UpdateReplacePolicy"] == "Snapshot"
    # enhanced monitoring (checkov 3's CKV_AWS_118) through a role RDS assumes, Performance Insights
    assert p["MonitoringInterval"] == 60 and is_ref(p["MonitoringRoleArn"], "DbMonitoringRole")
    assert p["EnablePerformanceInsights"] is True
    assert is_ref(p["DBSubnetGroupName"], "DbSubnetGroup")
    (subnets,) = resources(stack, "AWS::RDS::DBSubnetGroup").values()
    assert is_ref(subnets["Properties"]["SubnetIds"], "PrivateSubnetIds")
    for field in ("MasterUsername", "MasterUserPassword"):
        assert re.fullmatch(
            r"\{\{resolve:secretsmanager:\$\{DbSecret\}:SecretString:(username|password)\}\}",
            p[field]["Fn::Sub"],
        ), p[field]
    # the tasks get the credentials as secrets, never as plain environment values
    text = STACK.read_text()
    assert "DAGSTER_PG_PASSWORD" in text and not re.search(r"(?i)password:\s*[\"']?\w", text)
    for td in resources(stack, "AWS::ECS::TaskDefinition").values():
        (c,) = td["Properties"]["ContainerDefinitions"]
        env = set(environment(c, ALL_CONDITIONS))
        secrets = {s["Name"]: s["ValueFrom"]["Fn::Sub"] for s in c["Secrets"]}
        assert not {"DAGSTER_PG_PASSWORD", "DAGSTER_PG_USERNAME"} & env
        assert secrets == {
            "DAGSTER_PG_USERNAME": "${DbSecret}:username::",
            "DAGSTER_PG_PASSWORD": "${DbSecret}:password::",
            # the tracking server's (tests/deploy/test_tracking_stack.py)
            "MLFLOW_TRACKING_USERNAME": "${TrackingSecretArn}:username::",
            "MLFLOW_TRACKING_PASSWORD": "${TrackingSecretArn}:password::",
        }
    # and only the tasks reach it
    _, sg = next(
        (n, r)
        for n, r in resources(stack, "AWS::EC2::SecurityGroup").items()
        if n == "DbSecurityGroup"
    )
    (rule,) = sg["Properties"]["SecurityGroupIngress"]
    assert rule["FromPort"] == rule["ToPort"] == 5432 and is_ref(
        rule["SourceSecurityGroupId"], "TaskSecurityGroup"
    )


def test_the_ui_is_internal_and_reached_from_one_range(stack):
    _, lb = one(stack, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    assert lb["Properties"]["Scheme"] == "internal"
    sg = stack["Resources"]["LoadBalancerSecurityGroup"]["Properties"]
    (rule,) = sg["SecurityGroupIngress"]
    assert is_ref(rule["CidrIp"], "UiAllowedCidr")
    for svc in resources(stack, "AWS::ECS::Service").values():
        net = svc["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
        assert net["AssignPublicIp"] == "DISABLED" and is_ref(net["Subnets"], "PrivateSubnetIds")


def test_webserver_and_one_daemon_run_as_services_and_runs_as_tasks_of_their_own(stack):
    services = {
        s["Properties"]["ServiceName"]: s["Properties"]
        for s in resources(stack, "AWS::ECS::Service").values()
    }
    assert set(services) == {"webserver", "daemon"}
    daemon = services["daemon"]
    assert (
        daemon["DesiredCount"] == 1 and daemon["DeploymentConfiguration"]["MaximumPercent"] == 100
    )
    commands = {
        td["Properties"]["Family"]["Fn::Sub"]: td["Properties"]["ContainerDefinitions"][0].get(
            "Command"
        )
        for td in resources(stack, "AWS::ECS::TaskDefinition").values()
    }
    assert commands == {
        "${Project}-dagster-webserver": [
            "dagster-webserver",
            "-h",
            "0.0.0.0",
            "-p",
            "3000",
            "-w",
            "workspace.yaml",
        ],
        "${Project}-dagster-daemon": ["dagster-daemon", "run", "-w", "workspace.yaml"],
        "${Project}-dagster-run": None,  # EcsRunLauncher gives each run's command
    }
    # the launcher's task definition (dagster.yaml's env) is this family, and the only one it may run
    for td in resources(stack, "AWS::ECS::TaskDefinition").values():
        env = environment(td["Properties"]["ContainerDefinitions"][0])
        assert env["CVGRAPH_RUN_TASK_DEFINITION"] == {"Fn::Sub": "${Project}-dagster-run"}
    (run_task,) = [st for st in statements(stack) if st.get("Action") == "ecs:RunTask"]
    assert run_task["Resource"]["Fn::Sub"].endswith("task-definition/${Project}-dagster-run:*")


def test_the_tasks_give_the_training_jobs_the_tracking_secret_and_their_vpc(stack):
    """Every task that runs cvgraph code (webserver, daemon, run) gets the aws profile's training
    settings: the tracking secret's ARN always (a job reads it with its own role), the VpcConfig's
    subnets and groups when given, and nothing (no VPC) when not."""
    params = stack["Parameters"]
    for name, prefix in (("TrainingSubnetIds", "subnet-"), ("TrainingSecurityGroupIds", "sg-")):
        param = params[name]
        assert param["Type"] == "String" and param["Default"] == "", name
        pattern = param["AllowedPattern"]
        for good in ("", f"{prefix}0123abcd", f"{prefix}0123abcd,{prefix}0123456789abcdef0"):
            assert re.fullmatch(pattern, good), (name, good)
        # CVGRAPH_TRAINING_* are split on commas, nothing else: no spaces, no empty items
        for bad in (f"{prefix}0123abcd, {prefix}4567abcd", f"{prefix}0123abcd,", "x-0123abcd"):
            assert not re.fullmatch(pattern, bad), (name, bad)
    assert stack["Conditions"] == {
        "HasTrainingSubnets": {"Fn::Not": [{"Fn::Equals": [{"Ref": "TrainingSubnetIds"}, ""]}]},
        "HasTrainingSecurityGroups": {
            "Fn::Not": [{"Fn::Equals": [{"Ref": "TrainingSecurityGroupIds"}, ""]}]
        },
    }
    # both or neither: SageMaker refuses subnets without groups, and groups alone would be unused
    rules = stack["Rules"]
    assert {
        (
            r["RuleCondition"]["Fn::Not"][0]["Fn::Equals"][0]["Ref"],
            a["Assert"]["Fn::Not"][0]["Fn::Equals"][0]["Ref"],
        )
        for r in rules.values()
        for a in r["Assertions"]
    } == {
        ("TrainingSubnetIds", "TrainingSecurityGroupIds"),
        ("TrainingSecurityGroupIds", "TrainingSubnetIds"),
    }
    tds = resources(stack, "AWS::ECS::TaskDefinition")
    assert len(tds) == 3
    for name, td in tds.items():
        (c,) = td["Properties"]["ContainerDefinitions"]
        unset = environment(c)
        assert is_ref(unset["CVGRAPH_MLFLOW_SECRET_ARN"], "TrackingSecretArn"), name
        assert not {"CVGRAPH_TRAINING_SUBNETS", "CVGRAPH_TRAINING_SECURITY_GROUPS"} & set(unset)
        given = environment(c, ALL_CONDITIONS)
        assert is_ref(given["CVGRAPH_TRAINING_SUBNETS"], "TrainingSubnetIds"), name
        assert is_ref(given["CVGRAPH_TRAINING_SECURITY_GROUPS"], "TrainingSecurityGroupIds"), name
        assert set(given) - set(unset) == {
            "CVGRAPH_TRAINING_SUBNETS",
            "CVGRAPH_TRAINING_SECURITY_GROUPS",
        }
        # the rest of the profile's training settings travel with them
        assert is_ref(given["CVGRAPH_SAGEMAKER_ROLE_ARN"], "SageMakerRoleArn"), name
    # the names are the ones the aws profile reads
    profiles = (ROOT / "orchestration" / "profiles.py").read_text()
    for var in (
        "CVGRAPH_MLFLOW_SECRET_ARN",
        "CVGRAPH_TRAINING_SUBNETS",
        "CVGRAPH_TRAINING_SECURITY_GROUPS",
    ):
        assert f'"{var}"' in profiles, var


def test_roles_are_least_privilege(stack):
    for st in statements(stack):
        actions, res = as_list(st.get("Action", [])), as_list(st.get("Resource", []))
        assert not any(a == "*" or a.endswith(":*") for a in actions), st
        if st.get("Effect") == "Allow" and "*" in res:
            assert actions == ["ecs:DescribeTaskDefinition"], st  # no resource-level permissions
    (pass_role,) = [st for st in statements(stack) if st.get("Action") == "iam:PassRole"]
    assert (
        pass_role["Condition"]["StringEquals"]["iam:PassedToService"] == "ecs-tasks.amazonaws.com"
    )
    run_role = stack["Resources"]["RunTaskRole"]["Properties"]
    assert [is_ref(a, "OrchestratorPolicyArn") for a in run_role["ManagedPolicyArns"]] == [True]
    assert "Policies" not in run_role  # a run does what steps do: no launching of other runs


def test_the_image_installs_the_project_from_the_lock_and_runs_as_non_root():
    instructions = parse_dockerfile(IMAGE)
    copies = " ".join(a for i, a in instructions if i == "COPY")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    for pkg in (p.rstrip("*") for p in packages):
        assert f"{pkg}/ /opt/cvgraph/{pkg}/" in copies, pkg
    assert "deploy/dagster/dagster.yaml /opt/dagster/dagster.yaml" in copies
    run = " ".join(a for i, a in instructions if i == "RUN")
    assert "pip install -c requirements.lock ." in run and '"torch==2.13.0+cpu"' in run
    assert [a for i, a in instructions if i == "USER"] == ["10001:10001"]
    assert any(i == "HEALTHCHECK" for i, _ in instructions)
    env = " ".join(a for i, a in instructions if i == "ENV")
    assert "DAGSTER_HOME=/opt/dagster" in env


def test_the_deployed_instance_yaml_is_valid_and_works_on_postgres(
    postgres_database, tmp_path, monkeypatch
):
    """deploy/dagster/dagster.yaml as the tasks load it: its storage on a real PostgreSQL server,
    its run launcher dagster-aws's EcsRunLauncher (not started here: it would call ECS)."""
    from dagster._core.instance.config import dagster_instance_config

    url = urlparse(postgres_database("t_deployed_instance_yaml"))
    env = {
        "DAGSTER_PG_USERNAME": url.username,
        "DAGSTER_PG_PASSWORD": "from-secrets-manager",
        "DAGSTER_PG_HOST": url.hostname,
        "DAGSTER_PG_PORT": str(url.port),
        "DAGSTER_PG_DB": url.path[1:],
        "CVGRAPH_RUN_TASK_DEFINITION": "cvgraph-dagster-run",
        "CVGRAPH_MAX_CONCURRENT_RUNS": "8",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    home = tmp_path / "dagster"
    home.mkdir()
    shutil.copy(INSTANCE_YAML, home / "dagster.yaml")
    config, _ = dagster_instance_config(str(home))
    assert config["run_launcher"]["class"] == "EcsRunLauncher"
    assert config["run_launcher"]["module"] == "dagster_aws.ecs"
    assert config["run_queue"]["max_concurrent_runs"] == {"env": "CVGRAPH_MAX_CONCURRENT_RUNS"}
    # a run whose ECS task died is resumed once, then failed: its partitions are not held for good
    monitoring = config["run_monitoring"]
    assert monitoring["enabled"] and monitoring["max_resume_run_attempts"] == 1
    assert "from-secrets-manager" not in INSTANCE_YAML.read_text()
    # With run monitoring on, the instance asks its launcher at start (EcsRunLauncher would call
    # ECS): the storage is loaded here without that section, checked above.
    import yaml

    loaded = yaml.safe_load(INSTANCE_YAML.read_text())
    loaded.pop("run_monitoring")
    (home / "dagster.yaml").write_text(yaml.safe_dump(loaded))

    @dg.asset
    def hello() -> dg.MaterializeResult:
        return dg.MaterializeResult(data_version=dg.DataVersion("1"))

    with dg.DagsterInstance.from_config(str(home)) as inst:
        assert type(inst.run_storage).__name__ == "PostgresRunStorage"
        assert type(inst.event_log_storage).__name__ == "PostgresEventLogStorage"
        result = dg.materialize([hello], instance=inst)
        assert result.success and inst.get_latest_materialization_event(hello.key) is not None
