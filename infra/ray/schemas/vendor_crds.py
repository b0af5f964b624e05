"""Make the vendored, strict JSON schemas of KubeRay's CRDs (RayCluster, RayJob) from a local
KubeRay checkout, so `infra/ray/*.yaml` is validated offline (`check-jsonschema`, in the tests).

    python infra/ray/schemas/vendor_crds.py /path/to/kuberay [--commit SHA]

Reads `ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml` (KubeRay, Apache-2.0)
and writes `rayclusters.ray.io_v1.json` and `rayjobs.ray.io_v1.json` here: the `v1`
`openAPIV3Schema`, made strict as `kubectl --validate=strict` is (an unknown field is an error,
not silently pruned: every object schema with `properties` and no
`x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`), with
`x-kubernetes-int-or-string` spelled as JSON Schema (`integer` or `string`) and `apiVersion` /
`kind` pinned. Nothing is downloaded: the checkout is yours.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"rayclusters": "RayCluster", "rayjobs": "RayJob"}


def strict(node: object) -> object:
    """The schema with unknown fields refused and int-or-string made explicit (recursive)."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_schema(crd_file: Path, kind: str, version: str = "v1") -> dict:
    """The strict JSON schema of one CRD version."""
    crd = yaml.safe_load(crd_file.read_text())
    spec = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = strict(spec["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kuberay", type=Path, help="a local KubeRay checkout")
    p.add_argument("--commit", default="unknown", help="its commit, recorded in the schema files")
    args = p.parse_args()
    bases = args.kuberay / "ray-operator" / "config" / "crd" / "bases"
    for plural, kind in CRDS.items():
        schema = crd_schema(bases / f"ray.io_{plural}.yaml", kind)
        schema = {"$schema": "http://json-schema.org/draft-07/schema#",
                  "$comment": f"KubeRay {kind} v1 CRD schema (Apache-2.0), from ray-operator/config/crd/bases/"
                              f"ray.io_{plural}.yaml at {args.commit}, made strict by infra/ray/schemas/vendor_crds.py",
                  **schema}
        out = HERE / f"{plural}.ray.io_v1.json"
        out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{out.name}: {out.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
