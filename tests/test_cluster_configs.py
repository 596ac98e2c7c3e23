"""cluster/: the Ray launcher YAML against Ray's own cluster-config schema, and the KubeRay
manifests for structure and the fields KubeRay requires."""
import json
import shlex
from pathlib import Path

import pytest
import yaml

from grpo_ray.config import load_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REPO = CLUSTER.parent


def validate_config(cfg: dict) -> None:
    """Ray's cluster-config schema (ray/autoscaler/ray-schema.json), as `ray up` applies it.
    (ray.autoscaler's validate_config also wants the provider defaults merged in, which needs
    the cloud SDK; the schema is the part that catches mistakes in the file.)"""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)


def test_launcher_yaml_passes_rays_schema_and_has_an_autoscaling_verifier_group():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(cfg)  # raises on a schema violation
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    verifier = types["verifier"]
    assert verifier["resources"]["verifier"] > 0 and "GPU" not in verifier["resources"]
    assert verifier["min_workers"] == 0 < verifier["max_workers"]
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())
    assert any("bubblewrap" in c for c in cfg["setup_commands"])  # the code sandbox


def test_schema_check_catches_a_broken_launcher_yaml():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    cfg["available_node_types"]["verifier"]["min_wokers"] = 0  # a typo
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(cfg)


def _check_cluster_spec(spec: dict) -> dict:
    """KubeRay's required fields; returns the worker groups by name."""
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    (container, *_) = head["template"]["spec"]["containers"]
    assert container["name"] and container["image"]
    groups = {}
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["groupName"]
        assert all(c["name"] and c["image"] for c in g["template"]["spec"]["containers"])
        groups[g["groupName"]] = g
    return groups


def _custom_resources(group: dict) -> dict:
    raw = group["rayStartParams"].get("resources", '"{}"')
    return json.loads(json.loads(raw))  # KubeRay passes it to `ray start --resources` quoted


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests(name):
    doc = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert doc["kind"] in ("RayCluster", "RayJob")
    groups = _check_cluster_spec(spec)
    verifier = groups["verifier"]
    assert _custom_resources(verifier)["verifier"] > 0
    assert verifier["minReplicas"] == 0 < verifier["maxReplicas"]  # scales to zero when idle
    assert "nvidia.com/gpu" not in verifier["template"]["spec"]["containers"][0]["resources"]["limits"]
    if doc["kind"] == "RayJob":
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["grpo-ray", "train"] and (REPO / argv[2]).is_file()
        load_config(str(REPO / argv[2]), argv[3:])  # the job's config and overrides are valid
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])  # configs/ is not in the installed package:
        assert env["working_dir"] and "runs" in env["excludes"]  # the entrypoint runs in the repo's copy


def _k8s_gpu_group() -> dict:
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    gpu = _check_cluster_spec(doc["spec"]["rayClusterSpec"])["gpu"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}


@pytest.mark.parametrize("name", ["gsm8k_qwen2.5_1.5b_8gpu.yaml", "code_humaneval_8gpu.yaml",
                                  "gsm8k_qwen2.5_7b_lora_8gpu.yaml", "gsm8k_qwen2.5_1.5b_python_tool_8gpu.yaml"])
def test_realistic_configs_fit_the_gpu_nodes_of_both_cluster_definitions(name):
    """8 GPUs' worth of roles that one GPU node of aws.yaml and of the KubeRay job can hold, and
    a verifier pool no larger than the verifier nodes can run."""
    from grpo_ray.roles.placement import plan

    cfg = load_config(str(REPO / "configs" / name))
    bundles, slots = plan(cfg)
    need = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
    assert need["GPU"] == 8
    assert all(s.gpus > 0 for s in slots)  # every role on a GPU
    types = yaml.safe_load((CLUSTER / "aws.yaml").read_text())["available_node_types"]
    for node in (types["gpu_worker"]["resources"], _k8s_gpu_group()):
        assert all(need[k] <= node[k] for k in need), (node, need)
    pool = cfg.reward.pool
    verifier = types["verifier"]
    assert pool.max_replicas * pool.verifier_resource <= verifier["max_workers"] * verifier["resources"]["verifier"]
    assert pool.replica_cpus * verifier["resources"]["verifier"] <= verifier["resources"]["CPU"]


def _fits_on(bundles: list[dict], node: dict, count: int) -> bool:
    """Whether the bundles fit on `count` nodes of `node`'s resources, each bundle whole on one
    node (first fit, largest GPU bundles first: what a PACK placement can find)."""
    free = [dict(node) for _ in range(count)]
    for bundle in sorted(bundles, key=lambda b: (-b.get("GPU", 0.0), -b["CPU"])):
        spot = next((f for f in free if all(f.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())), None)
        if spot is None:
            return False
        for k, v in bundle.items():
            spot[k] -= v
    return True


def test_the_tensor_parallel_config_fits_two_gpu_nodes_of_both_cluster_definitions():
    """Qwen2.5-32B: each generator is one bundle of tensor_parallel GPUs (a TP group never spans
    nodes), and every bundle fits the GPU nodes aws.yaml and the KubeRay cluster can scale to."""
    from grpo_ray.roles.placement import plan

    cfg = load_config(str(REPO / "configs" / "gsm8k_qwen2.5_32b_tp4_16gpu.yaml"))
    bundles, slots = plan(cfg)
    tp = cfg.rollout.tensor_parallel
    assert tp == 4 and 40 % tp == 0 and 8 % tp == 0  # Qwen2.5-32B: 40 attention heads, 8 KV heads
    gens = [bundles[s.bundle] for s in slots if s.role == "generator"]
    assert gens and all(b["GPU"] == tp for b in gens)
    assert sum(b.get("GPU", 0.0) for b in bundles) == 16
    assert cfg.sync.method == "collective" and not cfg.uses_reference  # LoRA: the base is the reference
    types = yaml.safe_load((CLUSTER / "aws.yaml").read_text())["available_node_types"]
    k8s = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    gpu = _check_cluster_spec(k8s["spec"])["gpu"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    for node, count in ((types["gpu_worker"]["resources"], types["gpu_worker"]["max_workers"]),
                        ({"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}, gpu["maxReplicas"])):
        assert _fits_on(bundles, node, count), (node, count)
        assert not _fits_on(bundles, node, count - 1)  # it needs both nodes
