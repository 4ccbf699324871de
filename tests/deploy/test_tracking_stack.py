"""The tracking server's stack (deploy/cloudformation/tracking.yaml), its image and its entrypoint
(deploy/mlflow/serve.py): cfn-lint clean; the database private and encrypted with its password
only in Secrets Manager; MLflow's admin password generated into Secrets Manager and given to the
task only as an ECS secret; the server reachable only through an internal load balancer; its role
scoped to the artifacts prefix; the image installed from the lock, non-root, running serve.py; the
orchestrator's tasks pointed at it with its credentials. (Starting a real server through serve.py
is a runtime test of its own.)"""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from cfnlint.decode import decode

from tests.deploy.test_deploy import (
    as_list,
    cfn_lint_command,
    check_against_lock,
    constraints_and_names,
    dockerfile_argv,
    environment,
    is_ref,
    lock_path_in_image,
    one,
    parse_dockerfile,
    pip_installs,
    resources,
    statements,
    text,
)
from tests.source_imports import absolute_imports

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "deploy" / "cloudformation" / "tracking.yaml"
CVGRAPH = ROOT / "deploy" / "cloudformation" / "cvgraph.yaml"
ORCHESTRATOR = ROOT / "deploy" / "cloudformation" / "orchestrator.yaml"
IMAGE = ROOT / "deploy" / "docker" / "mlflow.Dockerfile"
SERVE = ROOT / "deploy" / "mlflow" / "serve.py"
PORT = 5000


@pytest.fixture(scope="module")
def stack() -> dict:
    tpl, matches = decode(str(STACK))
    assert not matches, matches
    return tpl


@pytest.fixture(scope="module")
def orchestrator() -> dict:
    tpl, matches = decode(str(ORCHESTRATOR))
    assert not matches, matches
    return tpl


@pytest.fixture(scope="module")
def serve():
    """deploy/mlflow/serve.py as a module (deploy/ is no package)."""
    spec = importlib.util.spec_from_file_location("cvgraph_deploy_mlflow_serve", SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def container(stack: dict) -> dict:
    (td,) = resources(stack, "AWS::ECS::TaskDefinition").values()
    (c,) = td["Properties"]["ContainerDefinitions"]
    return c


def test_cfn_lint_is_clean():
    proc = subprocess.run(
        [*cfn_lint_command(), str(STACK)], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


# -- the database ----------------------------------------------------------------------------
def test_the_database_is_private_encrypted_monitored_and_its_password_only_in_secrets_manager(
    stack,
):
    name, db = one(stack, "AWS::RDS::DBInstance")
    p = db["Properties"]
    assert p["Engine"] == "postgres" and p["DBName"] == "mlflow"
    assert p["StorageEncrypted"] is True and p["PubliclyAccessible"] is False
    assert p["DeletionProtection"] is True
    assert db["DeletionPolicy"] == db["UpdateReplacePolicy"] == "Snapshot"
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
    attachment = one(stack, "AWS::SecretsManager::SecretTargetAttachment")[1]["Properties"]
    assert is_ref(attachment["SecretId"], "DbSecret") and is_ref(attachment["TargetId"], name)
    # only the server's task reaches it
    (rule,) = stack["Resources"]["DbSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert rule["FromPort"] == rule["ToPort"] == 5432
    assert is_ref(rule["SourceSecurityGroupId"], "ServerSecurityGroup")
    monitoring = stack["Resources"]["DbMonitoringRole"]["Properties"]
    (trust,) = monitoring["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "monitoring.rds.amazonaws.com"}


def test_passwords_are_generated_into_secrets_manager_and_reach_the_task_only_as_secrets(stack):
    secrets = resources(stack, "AWS::SecretsManager::Secret")
    assert set(secrets) == {"DbSecret", "AdminSecret", "FlaskSecretKey"}
    key = secrets.pop("FlaskSecretKey")["Properties"]["GenerateSecretString"]
    assert key["PasswordLength"] >= 32 and "SecretStringTemplate" not in key  # one plain string
    users = {}
    for name, secret in secrets.items():  # JSON {"username", "password"}, the password generated
        generate = secret["Properties"]["GenerateSecretString"]
        assert generate["GenerateStringKey"] == "password", name
        assert generate["PasswordLength"] >= 32, name
        users[name] = json.loads(generate["SecretStringTemplate"])
    assert users == {"DbSecret": {"username": "mlflow"}, "AdminSecret": {"username": "admin"}}
    # no password in the template, the task's plain environment, or a parameter
    text_ = STACK.read_text()
    assert not re.search(r"(?i)password:\s*[\"']?\w", text_)
    assert not [n for n in stack["Parameters"] if "password" in n.lower()]
    c = container(stack)
    env = {e["Name"] for e in c["Environment"]}
    assert not {n for n in env if "PASSWORD" in n or "SECRET" in n or n.endswith("_USER")}
    assert {s["Name"]: text(s["ValueFrom"]) for s in c["Secrets"]} == {
        "MLFLOW_DB_USER": "${DbSecret}:username::",
        "MLFLOW_DB_PASSWORD": "${DbSecret}:password::",
        "MLFLOW_AUTH_ADMIN_USERNAME": "${AdminSecret}:username::",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "${AdminSecret}:password::",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "${FlaskSecretKey}",
    }
    # the execution role (not the server's own role) reads exactly those secrets
    reads = [
        st
        for st in statements(stack["Resources"]["TaskExecutionRole"])
        if "secretsmanager:GetSecretValue" in as_list(st["Action"])
    ]
    assert [sorted(text(r) for r in as_list(st["Resource"])) for st in reads] == [
        ["${AdminSecret}", "${DbSecret}", "${FlaskSecretKey}"]
    ]
    assert not [
        st
        for st in statements(stack["Resources"]["ServerTaskRole"])
        if any(a.startswith("secretsmanager:") for a in as_list(st["Action"]))
    ]
    # the admin secret's ARN is an output (the orchestrator's TrackingSecretArn)
    assert is_ref(stack["Outputs"]["AdminSecretArn"]["Value"], "AdminSecret")


# -- the network -----------------------------------------------------------------------------
def test_the_server_is_reachable_only_through_an_internal_load_balancer(stack):
    _, lb = one(stack, "AWS::ElasticLoadBalancingV2::LoadBalancer")
    assert lb["Properties"]["Scheme"] == "internal"
    assert is_ref(lb["Properties"]["Subnets"], "PrivateSubnetIds")
    _, listener = one(stack, "AWS::ElasticLoadBalancingV2::Listener")
    assert listener["Properties"]["Port"] == PORT
    [action] = listener["Properties"]["DefaultActions"]
    assert action["Type"] == "forward" and is_ref(action["TargetGroupArn"], "ServerTargetGroup")
    _, tg = one(stack, "AWS::ElasticLoadBalancingV2::TargetGroup")
    assert tg["Properties"]["HealthCheckPath"] == "/health"
    assert tg["Properties"]["Port"] == PORT and tg["Properties"]["TargetType"] == "ip"

    # the load balancer admits AllowedCidr and the wearers of ClientSecurityGroup, on the port
    sgs = stack["Resources"]
    (cidr,) = sgs["LoadBalancerSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert is_ref(cidr["CidrIp"], "AllowedCidr") and cidr["FromPort"] == cidr["ToPort"] == PORT
    ingress = [r["Properties"] for r in resources(stack, "AWS::EC2::SecurityGroupIngress").values()]
    assert len(ingress) == 1 and is_ref(ingress[0]["GroupId"], "LoadBalancerSecurityGroup")
    assert is_ref(ingress[0]["SourceSecurityGroupId"], "ClientSecurityGroup")
    assert ingress[0]["FromPort"] == ingress[0]["ToPort"] == PORT
    # a client's group opens nothing but the way to the load balancer
    (egress,) = sgs["ClientSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    assert is_ref(egress["DestinationSecurityGroupId"], "LoadBalancerSecurityGroup")
    assert egress["FromPort"] == egress["ToPort"] == PORT
    assert "SecurityGroupIngress" not in sgs["ClientSecurityGroup"]["Properties"]
    # the task: private subnets, no public IP, inbound only from the load balancer
    _, svc = one(stack, "AWS::ECS::Service")
    net = svc["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert net["AssignPublicIp"] == "DISABLED" and is_ref(net["Subnets"], "PrivateSubnetIds")
    assert [is_ref(g, "ServerSecurityGroup") for g in net["SecurityGroups"]] == [True]
    (server_in,) = sgs["ServerSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert is_ref(server_in["SourceSecurityGroupId"], "LoadBalancerSecurityGroup")
    assert server_in["FromPort"] == server_in["ToPort"] == PORT
    [target] = svc["Properties"]["LoadBalancers"]
    assert target["ContainerPort"] == PORT and is_ref(target["TargetGroupArn"], "ServerTargetGroup")
    assert [m["ContainerPort"] for m in container(stack)["PortMappings"]] == [PORT]
    # the URI clients get is that listener's
    assert stack["Outputs"]["TrackingUri"]["Value"] == {
        "Fn::Sub": "http://${LoadBalancer.DNSName}:" + str(PORT)
    }
    assert is_ref(stack["Outputs"]["ClientSecurityGroupId"]["Value"], "ClientSecurityGroup")


# -- the server's role and its environment ----------------------------------------------------
def test_the_server_role_reaches_the_artifacts_prefix_only(stack):
    role = stack["Resources"]["ServerTaskRole"]["Properties"]
    assert "ManagedPolicyArns" not in role
    policy = [st for p in role["Policies"] for st in p["PolicyDocument"]["Statement"]]
    bucket = "arn:${AWS::Partition}:s3:::${LakeBucketName}"
    assert all(st["Effect"] == "Allow" for st in policy)
    assert {
        (a, text(r))
        for st in policy
        for a in as_list(st["Action"])
        for r in as_list(st["Resource"])
    } == {("s3:ListBucket", bucket)} | {
        (a, bucket + "/${ArtifactsPrefix}/*")
        for a in (
            "s3:GetObject",
            "s3:PutObject",
            "s3:DeleteObject",
            "s3:AbortMultipartUpload",
            "s3:ListMultipartUploadParts",
        )
    }
    [listing] = [st for st in policy if st["Action"] == "s3:ListBucket"]
    assert listing["Condition"] == {
        "StringLike": {"s3:prefix": {"Fn::Sub": "${ArtifactsPrefix}/*"}}
    }
    env = {e["Name"]: e["Value"] for e in container(stack)["Environment"]}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == {
        "Fn::Sub": "s3://${LakeBucketName}/${ArtifactsPrefix}"
    }
    assert stack["Parameters"]["ArtifactsPrefix"]["Default"] == "mlflow"
    for bad in ("/mlflow", "mlflow/", "a//b", ""):
        assert not re.fullmatch(stack["Parameters"]["ArtifactsPrefix"]["AllowedPattern"], bad)


def test_the_task_gives_serve_py_everything_it_reads(stack, serve):
    """serve.command() on the task definition's environment and secrets (stand-in values): the
    server starts with the database, the artifacts destination, the port of the load balancer."""
    c = container(stack)
    env = {e["Name"]: e["Value"] for e in c["Environment"]}
    given = {
        name: value if isinstance(value, str) else f"<{name}>" for name, value in env.items()
    } | {s["Name"]: f"<secret {s['Name']}>" for s in c["Secrets"]}
    argv = serve.command(given)
    assert argv[1:4] == ["-m", "mlflow", "server"]
    opts = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert opts["--app-name"] == "basic-auth"
    assert opts["--artifacts-destination"] == "<MLFLOW_ARTIFACTS_DESTINATION>"
    assert opts["--backend-store-uri"].split("+")[0].split(":")[0] == "postgresql"
    assert opts["--host"] == "0.0.0.0" and opts["--port"] == str(PORT)
    assert opts["--workers"] == "<MLFLOW_WORKERS>"
    assert env["MLFLOW_PORT"] == str(PORT)
    assert env["MLFLOW_SERVER_ALLOWED_HOSTS"] == {
        "Fn::Sub": "${LoadBalancer.DNSName}:" + str(PORT) + ",${LoadBalancer.DNSName}"
    }
    # every MLFLOW_* the task sets is one serve.py or MLflow reads
    documented = set(re.findall(r"``(MLFLOW_[A-Z_]+)``", serve.__doc__))
    assert {n for n in given if n.startswith("MLFLOW_")} <= documented
    # logs go to the stack's log group
    logs = c["LogConfiguration"]
    assert logs["LogDriver"] == "awslogs"
    assert is_ref(logs["Options"]["awslogs-group"], "ServerLogGroup")
    group = stack["Resources"]["ServerLogGroup"]["Properties"]
    assert is_ref(group["RetentionInDays"], "LogRetentionDays")


def test_serve_builds_the_command_and_quotes_the_database_password(serve, tmp_path):
    password = "p@ss:w/rd%41 #?&+é"
    env = {
        "MLFLOW_DB_HOST": "db.internal",
        "MLFLOW_DB_PORT": "5433",
        "MLFLOW_DB_NAME": "tracking",
        "MLFLOW_DB_USER": "ml flow",
        "MLFLOW_DB_PASSWORD": password,
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://lake/mlflow",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-secret",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret",
    }
    uri = serve.backend_store_uri(env)
    parsed = urlparse(uri)
    assert parsed.scheme.split("+")[0] == "postgresql" and parsed.hostname == "db.internal"
    assert parsed.port == 5433 and parsed.path == "/tracking"
    assert unquote(parsed.username) == "ml flow" and unquote(parsed.password) == password
    assert "@" not in uri.split("@", 1)[0].split("//", 1)[1].replace("%40", "")

    argv = serve.command(env)
    assert argv[0] == sys.executable
    assert argv[argv.index("--backend-store-uri") + 1] == uri
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://lake/mlflow"
    assert argv[argv.index("--port") + 1] == "5000"  # the defaults
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--workers") + 1] == "2"
    # the auth app's file keeps the URI exact through configparser's '%' interpolation
    path = serve.auth_config(uri, str(tmp_path))
    config = configparser.ConfigParser()
    config.read(path)
    assert config["mlflow"]["database_uri"] == uri
    assert config["mlflow"]["default_permission"] == "READ"

    # the defaults of the optional ones, and an explicit store URI used as is
    minimal = {k: env[k] for k in env if k not in ("MLFLOW_DB_PORT", "MLFLOW_DB_NAME")}
    assert serve.backend_store_uri(minimal).endswith("@db.internal:5432/mlflow")
    assert (
        serve.backend_store_uri({"MLFLOW_BACKEND_STORE_URI": "postgresql://u:p@h/x"})
        == "postgresql://u:p@h/x"
    )
    # what is missing is said, before anything starts
    for missing in ("MLFLOW_DB_HOST", "MLFLOW_DB_PASSWORD"):
        with pytest.raises(SystemExit, match=missing):
            serve.backend_store_uri({k: v for k, v in env.items() if k != missing})
    for missing in (
        "MLFLOW_ARTIFACTS_DESTINATION",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
        with pytest.raises(SystemExit, match=missing):
            serve.command({k: v for k, v in env.items() if k != missing})


# -- the image -------------------------------------------------------------------------------
def test_the_image_installs_the_server_from_the_lock_runs_non_root_and_runs_serve_py(lock):
    instructions = parse_dockerfile(IMAGE)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    [install] = pip_installs(instructions)
    constraints, names = constraints_and_names(install)
    assert constraints == [lock_path_in_image(instructions)]
    assert set(names) == {"mlflow[auth]", "psycopg2-binary", "boto3"}
    check_against_lock(names, lock)
    # the auth extra's own requirements (Flask-WTF) are in the lock too, so pinned by it
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    extra = [
        Requirement(r)
        for r in importlib.metadata.requires("mlflow")
        if Requirement(r).marker
        and Requirement(r).marker.evaluate({"extra": "auth"})
        and not Requirement(r).marker.evaluate({"extra": ""})
    ]
    assert extra and all(canonicalize_name(r.name) in lock for r in extra), extra
    assert lock["mlflow"] == importlib.metadata.version("mlflow")

    copies = [a for i, a in instructions if i == "COPY"]
    assert "deploy/mlflow/serve.py /app/serve.py" in copies
    assert dockerfile_argv(instructions) == ["python", "/app/serve.py"]
    users = [a for i, a in instructions if i == "USER"]
    assert users == ["10001:10001"]
    run = " ".join(a for i, a in instructions if i == "RUN")
    assert "useradd" in run and "--uid 10001" in run
    [health] = [a for i, a in instructions if i == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{PORT}/health" in health
    assert [a for i, a in instructions if i == "EXPOSE"] == [str(PORT)]
    # serve.py runs on the standard library alone, before mlflow is exec'd
    imported = {module.split(".")[0] for module, _ in absolute_imports(SERVE)}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_the_task_definition_runs_the_images_command(stack):
    c = container(stack)
    assert "Command" not in c and "EntryPoint" not in c  # the image's: python /app/serve.py
    assert c["Image"] == {"Fn::Sub": "${MlflowRepository.RepositoryUri}:${MlflowImageTag}"}
    assert "import urllib.request" in c["HealthCheck"]["Command"][-1]
    assert f"127.0.0.1:{PORT}/health" in c["HealthCheck"]["Command"][-1]


# -- the orchestrator as a client ------------------------------------------------------------
def test_the_orchestrator_tasks_get_the_tracking_uri_and_credentials(stack, orchestrator):
    params = orchestrator["Parameters"]
    # each tracking parameter is one of the tracking stack's outputs
    for param, output in {
        "TrackingUri": "TrackingUri",
        "TrackingSecretArn": "AdminSecretArn",
        "TrackingClientSecurityGroupId": "ClientSecurityGroupId",
    }.items():
        assert param in params and output in stack["Outputs"], param
        assert "tracking.yaml" in params[param]["Description"], param
    assert re.fullmatch(
        params["TrackingSecretArn"]["AllowedPattern"],
        "arn:aws:secretsmanager:eu-west-1:123456789012:secret:cvgraph/mlflow-admin-AbCdEf",
    )
    tds = resources(orchestrator, "AWS::ECS::TaskDefinition")
    assert len(tds) == 3
    for name, td in tds.items():
        (c,) = td["Properties"]["ContainerDefinitions"]
        env = environment(c, frozenset(orchestrator["Conditions"]))
        assert is_ref(env["MLFLOW_TRACKING_URI"], "TrackingUri"), name
        assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} & set(env), name
        secrets = {s["Name"]: s["ValueFrom"]["Fn::Sub"] for s in c["Secrets"]}
        assert secrets["MLFLOW_TRACKING_USERNAME"] == "${TrackingSecretArn}:username::", name
        assert secrets["MLFLOW_TRACKING_PASSWORD"] == "${TrackingSecretArn}:password::", name
        # and their execution role may read that secret
        role = td["Properties"]["ExecutionRoleArn"]
        assert is_ref(role, "TaskExecutionRole"), name
    reads = {
        text(r)
        for st in statements(orchestrator["Resources"]["TaskExecutionRole"])
        if "secretsmanager:GetSecretValue" in as_list(st["Action"])
        for r in as_list(st["Resource"])
    }
    assert reads == {"${DbSecret}", "${TrackingSecretArn}"}
    # the webserver and the daemon wear the tracking server's client group; a run task takes
    # the daemon's networking (EcsRunLauncher, use_current_ecs_task_config)
    for name, svc in resources(orchestrator, "AWS::ECS::Service").items():
        groups = svc["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"]
        assert any(is_ref(g, "TrackingClientSecurityGroupId") for g in groups), name
    instance = (ROOT / "deploy" / "dagster" / "dagster.yaml").read_text()
    assert "use_current_ecs_task_config: true" in instance


# -- the training jobs as clients -------------------------------------------------------------
def test_the_sagemaker_role_may_read_the_admin_secret_and_nothing_else_here(stack, orchestrator):
    """A training job reads the tracking server's credentials itself, with its role (cvgraph.yaml's
    SageMakerExecutionRole, named by a parameter): GetSecretValue on the admin secret, the one
    the orchestrator hands the jobs as CVGRAPH_MLFLOW_SECRET_ARN (its TrackingSecretArn)."""
    param = stack["Parameters"]["SageMakerRoleName"]
    assert "Default" not in param and "SageMakerRoleName" in param["Description"]
    # a role name CloudFormation generates passes; an ARN (the other output) does not
    assert re.fullmatch(param["AllowedPattern"], "cvgraph-SageMakerExecutionRole-AbC123xYz0")
    assert not re.fullmatch(
        param["AllowedPattern"], "arn:aws:iam::123456789012:role/cvgraph-SageMakerExecutionRole-x"
    )
    cvgraph, matches = decode(str(CVGRAPH))
    assert not matches, matches
    assert is_ref(cvgraph["Outputs"]["SageMakerRoleName"]["Value"], "SageMakerExecutionRole")

    (name, policy) = one(stack, "AWS::IAM::Policy")
    assert not resources(stack, "AWS::IAM::ManagedPolicy")
    props = policy["Properties"]
    assert [is_ref(r, "SageMakerRoleName") for r in props["Roles"]] == [True]
    assert set(props) == {"PolicyName", "PolicyDocument", "Roles"}  # no user, no group
    assert props["PolicyDocument"]["Statement"] == [
        {
            "Sid": "ReadTheTrackingSecret",
            "Effect": "Allow",
            "Action": "secretsmanager:GetSecretValue",
            "Resource": {"Ref": "AdminSecret"},
        }
    ]
    # the parameter reaches nothing else of the stack
    uses = [n for n, r in stack["Resources"].items() if "SageMakerRoleName" in json.dumps(r)]
    assert uses == [name]
    # the same secret the orchestrator gives the jobs: TrackingSecretArn is AdminSecretArn
    assert is_ref(stack["Outputs"]["AdminSecretArn"]["Value"], "AdminSecret")
    assert "AdminSecretArn" in orchestrator["Parameters"]["TrackingSecretArn"]["Description"]
    for td in resources(orchestrator, "AWS::ECS::TaskDefinition").values():
        (c,) = td["Properties"]["ContainerDefinitions"]
        assert is_ref(environment(c)["CVGRAPH_MLFLOW_SECRET_ARN"], "TrackingSecretArn")
    # and a job in VPC mode may wear the client group, whose one outbound rule stays the way
    # to the load balancer (S3, ECR, logs and Secrets Manager come from a group of its own)
    (egress,) = stack["Resources"]["ClientSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    assert egress["FromPort"] == egress["ToPort"] == PORT
    assert "TrainingSecurityGroupIds" in stack["Outputs"]["ClientSecurityGroupId"]["Description"]
    assert "TrainingSecurityGroupIds" in orchestrator["Parameters"]
