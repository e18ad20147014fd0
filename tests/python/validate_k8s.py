"""Validates Kubernetes manifests against the Kubernetes API's JSON schemas (generated from its
OpenAPI spec), strictly: a field the API does not know is an error, as is a wrong type or a
missing required field. The schemas come with PyPI's kubernetes-validate (no network needed);
scripts/test.sh installs it into the cache and tests/launchers.rs runs this script.

usage: validate_k8s.py [-k VERSION]... FILE...

Every YAML document of every FILE is validated against each Kubernetes VERSION (default: 1.29
and the newest one the package knows). Kinds the API itself does not define are reported as
not validated: ServiceMonitor (a CustomResourceDefinition of the Prometheus Operator) and
Kustomization (kustomize's own file); any other kind without a schema is an error.

Exit status: 0 all valid, 1 an invalid document, 3 kubernetes_validate is not importable.
"""

import argparse
import sys

NOT_API_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "a Prometheus Operator CRD, no schema in the Kubernetes API",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomize's own file, not an API object",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", "--kubernetes-version", action="append", dest="versions")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    try:
        import kubernetes_validate
        import kubernetes_validate.utils as kv_utils
        from kubernetes_validate.version import __version__
        import yaml
    except ImportError as e:
        print(f"kubernetes-validate is not importable: {e}", file=sys.stderr)
        return 3

    versions = args.versions or ["1.29", kv_utils.latest_version()]
    failures = 0
    validated = 0
    for path in args.files:
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        if not docs:
            print(f"ERROR {path}: no YAML document")
            failures += 1
        for doc in docs:
            kind, api = doc.get("kind", "?"), doc.get("apiVersion", "?")
            name = (doc.get("metadata") or {}).get("name", "?")
            what = f"{path} {kind}/{name}"
            if (api, kind) in NOT_API_KINDS:
                print(f"SKIP  {what}: {NOT_API_KINDS[(api, kind)]}")
                continue
            for version in versions:
                try:
                    checked = kubernetes_validate.validate(doc, version, strict=True)
                    print(f"OK    {what} ({api}) against Kubernetes {checked}")
                    validated += 1
                except kubernetes_validate.ValidationError as e:
                    field = ".".join(str(p) for p in e.path)
                    print(f"ERROR {what} against Kubernetes {e.version}: {field}: {e.message}")
                    failures += 1
                except (kv_utils.SchemaNotFoundError, kv_utils.InvalidSchemaError, kv_utils.VersionNotSupportedError) as e:
                    print(f"ERROR {what}: {getattr(e, 'message', e)}")
                    failures += 1
    print(f"kubernetes-validate {__version__}: {validated} validations passed, {failures} failed "
          f"(Kubernetes {', '.join(versions)}, strict)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
