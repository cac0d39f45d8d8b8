"""k8s/: the KubeRay RayService checked against the vendored RayService CRD schema (KubeRay's own), its pod
templates against Kubernetes 1.31's schemas (kubernetes-validate), and its serveConfigV2 against Ray's
ServeDeploySchema and our AppConfig; placement facts; the Dockerfiles build the package. No cluster needed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parent.parent / "k8s"
KUBERNETES = "1.31.0"


def _manifest() -> dict:
    return yaml.safe_load((K8S / "rayservice.yaml").read_text())


def _crd_schema() -> dict:
    vendored = json.loads((K8S / "schemas" / "ray.io_rayservices.v1.json").read_text())
    assert vendored["source"].startswith("https://github.com/ray-project/kuberay/blob/")
    return _structural(vendored["openAPIV3Schema"])


def _structural(schema):
    """The schema as the API server applies a structural CRD schema: an object with `properties` keeps only those
    (unknown fields are pruned, which `kubectl apply --validate=strict` refuses) unless it says
    `x-kubernetes-preserve-unknown-fields` or has `additionalProperties` of its own."""
    if isinstance(schema, list):
        return [_structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    pruned = {key: _structural(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        pruned["additionalProperties"] = False
    return pruned


def _int_or_string(checker, instance) -> bool:
    return isinstance(instance, (int, str)) and not isinstance(instance, bool)


def _validator(schema: dict) -> jsonschema.Validator:
    """Draft 7 plus what OpenAPI v3 / Kubernetes add: `x-kubernetes-int-or-string` fields take either."""

    def int_or_string(validator, value, instance, schema):
        if value and not _int_or_string(None, instance):
            yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")

    def typed(validator, types, instance, schema):
        if schema.get("x-kubernetes-int-or-string"):
            return  # checked by the keyword above
        yield from jsonschema.Draft7Validator.VALIDATORS["type"](validator, types, instance, schema)

    kind = jsonschema.validators.extend(
        jsonschema.Draft7Validator, {"x-kubernetes-int-or-string": int_or_string, "type": typed}
    )
    return kind(schema)


def _crd_errors(document: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(_crd_schema()).iter_errors(document)
    ]


def _pod_templates(document: dict) -> list[dict]:
    cluster = document["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


def test_rayservice_matches_the_kuberay_crd_schema():
    document = _manifest()
    assert document["apiVersion"] == "ray.io/v1" and document["kind"] == "RayService"
    assert _crd_errors(document) == []
    broken = copy.deepcopy(document)  # the check can fail: wrong types
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "one"
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"] = ["num-cpus", "0"]
    assert len(_crd_errors(broken)) == 2, _crd_errors(broken)
    # misspelt fields, at the top of the spec and deep in a pod template, are unknown fields
    misspelt = copy.deepcopy(document)
    cluster = misspelt["spec"]["rayClusterConfig"]
    cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "IfNotPresent"
    errors = _crd_errors(misspelt)
    assert len(errors) == 2 and all("Additional properties" in e for e in errors), errors


def test_pod_templates_match_the_kubernetes_schemas():
    for template in _pod_templates(_manifest()):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)
    broken = copy.deepcopy(_pod_templates(_manifest())[0])
    broken["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": broken}
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)


def test_serve_config_is_rays_and_ours():
    from blip2_serve.serve.config import REQUEST_PATH_ENVIRONMENT
    from blip2_serve.serve.deploy_config import IMPORT_PATH, SERVICER_FUNCTIONS, app_config_of
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(_manifest()["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)
    (application,) = schema.applications
    assert application.import_path == IMPORT_PATH
    assert serve_config["grpc_options"]["grpc_servicer_functions"] == SERVICER_FUNCTIONS  # the gRPC service's home
    config = app_config_of(serve_config)  # what app_builder will be given, validated as it will be
    assert config.model.checkpoint == "Salesforce/blip2-opt-2.7b" and config.model.device == "cuda"
    assert config.server.host == "0.0.0.0" and config.server.api_key_env
    # the deployments: section (which Ray applies over the builder's options) agrees with the args
    for deployment in serve_config["applications"][0]["deployments"]:
        stage = getattr(config, deployment["name"].lower())
        assert deployment["ray_actor_options"]["num_gpus"] == stage.num_gpus
        assert deployment["autoscaling_config"]["max_replicas"] == stage.autoscaling.max_replicas
        # Ray takes ray_actor_options from this section whole: the builder's runtime_env must be restated here
        env = deployment["ray_actor_options"]["runtime_env"]["env_vars"]
        assert env.items() >= REQUEST_PATH_ENVIRONMENT.items(), deployment["name"]


def _start_param(group: dict, name: str) -> float:
    return float(group["rayStartParams"].get(name, 0))


def test_replicas_fit_where_the_resources_are():
    """Each stage's replica fits a node group that offers what it asks for; GPU stages only GPU pods."""
    document = _manifest()
    cluster = document["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert _start_param(cluster["headGroupSpec"], "num-cpus") == 0  # nothing scheduled on the head
    gpu = groups["gpu"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == _start_param(gpu, "num-gpus") == 1
    serve_config = yaml.safe_load(document["spec"]["serveConfigV2"])
    options = {d["name"]: d["ray_actor_options"] for d in serve_config["applications"][0]["deployments"]}
    assert options["Ingress"]["num_gpus"] == 0 and options["Ingress"]["num_cpus"] <= _start_param(
        groups["cpu"], "num-cpus"
    )
    assert options["Vision"]["num_gpus"] + options["LLM"]["num_gpus"] <= _start_param(gpu, "num-gpus")
    assert options["Vision"]["num_cpus"] + options["LLM"]["num_cpus"] <= _start_param(gpu, "num-cpus")
    for group in groups.values():  # the API key the ingress reads reaches the pods from a Secret
        env = {e["name"] for e in group["template"]["spec"]["containers"][0].get("env", [])}
        assert "BLIP2_SERVE_API_KEY" in env


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_install_the_package(name):
    text = (K8S / name).read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    copied = {line.split()[1] for line in lines if line.startswith("COPY ")}
    assert {"blip2_serve", "serve", "deployments", "exporters", "clients", "pyproject.toml"} <= copied
    assert "bench" not in copied and "tests" not in copied  # the image holds the package, not the checkout
    installs = [line for line in lines if line.startswith("RUN pip install")]
    torch_first = next(i for i, line in enumerate(installs) if "torch==2.13.0" in line)
    package = next(i for i, line in enumerate(installs) if "'.[server" in line)
    assert torch_first < package  # the pinned torch build decides CPU or CUDA before the package pulls one
    assert ("download.pytorch.org/whl/cpu" in installs[torch_first]) == (name == "Dockerfile.cpu")
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
