#!/usr/bin/env python3
"""Converts one Gateway API HTTPRoute conformance test into a corpus file for tests/conformance.rs.

Usage: convert.py NAME COMMIT GATEWAY_API_CHECKOUT > tests/conformance/httproute-NAME.json

Reads conformance/tests/httproute-NAME.go (its http.ExpectedResponse composite literals) and
.yaml (the HTTPRoutes and Gateways) from a checkout of kubernetes-sigs/gateway-api at COMMIT and
prints the routes and cases as data. Checks the Go test computes in code (weighted
distributions, the WebSocket exchange, which subtest talks to which gateway) are not in its
tables: they were added to the JSON by hand, and each file says so where it matters."""
import json, re, sys, yaml

CONST = {
    "confsuite.InfraBackendServiceNameV1": "infra-backend-v1",
    "confsuite.InfraBackendServiceNameV2": "infra-backend-v2",
    "confsuite.InfraBackendServiceNameV3": "infra-backend-v3",
    "confsuite.InfrastructureNamespace": "gateway-conformance-infra",
    "ns": "gateway-conformance-infra",
    "roundtripper.H2CPriorKnowledgeProtocol": "H2C_PRIOR_KNOWLEDGE",
    "true": True, "false": False, "nil": None,
}

def tokens(src):
    i = 0
    out = []
    while i < len(src):
        c = src[i]
        if src.startswith("//", i):
            i = src.index("\n", i) if "\n" in src[i:] else len(src)
        elif c.isspace():
            i += 1
        elif c == '"':
            j = i + 1
            while src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append(("str", json.loads(src[i:j + 1])))
            i = j + 1
        elif c == "`":
            j = src.index("`", i + 1)
            out.append(("str", src[i + 1:j]))
            i = j + 1
        elif c.isdigit():
            m = re.match(r"\d+", src[i:])
            out.append(("num", int(m.group())))
            i += len(m.group())
        elif c.isalpha() or c == "_" or c == "[":
            m = re.match(r"(\[\])?(map\[string\](\[\])?)?[A-Za-z_][A-Za-z0-9_.]*(\[[A-Za-z0-9_.]*\])?", src[i:])
            if not m or not m.group():
                raise SystemExit(f"cannot tokenize at {src[i:i+40]!r}")
            out.append(("id", m.group()))
            i += len(m.group())
        elif c in "{}:,&()":
            out.append((c, c))
            i += 1
        else:
            raise SystemExit(f"unexpected {c!r} at {src[i:i+40]!r}")
    return out

def parse_value(ts, k):
    kind, v = ts[k]
    if kind == "&":
        return parse_value(ts, k + 1)
    if kind in ("str", "num"):
        return v, k + 1
    if kind == "id":
        if k + 1 < len(ts) and ts[k + 1][0] == "(":
            # ptr.To[int32](50) and the like: the argument.
            val, k2 = parse_value(ts, k + 2)
            assert ts[k2][0] == ")"
            return val, k2 + 1
        if k + 1 < len(ts) and ts[k + 1][0] == "{":
            return parse_composite(ts, k + 1, v)
        if v in CONST:
            return CONST[v], k + 1
        if v.startswith("http.Method"):
            return v[len("http.Method"):].upper(), k + 1
        raise SystemExit(f"unknown identifier {v}")
    if kind == "{":
        return parse_composite(ts, k, None)
    raise SystemExit(f"unexpected token {ts[k]}")

def parse_composite(ts, k, typ):
    assert ts[k][0] == "{"
    k += 1
    keyed, items = {}, []
    while ts[k][0] != "}":
        if ts[k + 1][0] == ":" and ts[k][0] in ("id", "str"):
            key = ts[k][1]
            val, k = parse_value(ts, k + 2)
            keyed[key] = val
        else:
            val, k = parse_value(ts, k)
            items.append(val)
        if ts[k][0] == ",":
            k += 1
    return (keyed if keyed or not items else items), k + 1

def test_cases(go):
    cases = []
    for m in re.finditer(r"(\[\])?http\.ExpectedResponse\s*\{", go):
        if m.start() > 0 and go[m.start() - 1] == "]":
            continue
        if re.search(r"func\s*\([^)]*$", go[max(0, m.start() - 60):m.start()]):
            continue
        start = m.end() - 1
        depth = 0
        for j in range(start, len(go)):
            if go[j] == "{":
                depth += 1
            elif go[j] == "}":
                depth -= 1
                if depth == 0:
                    break
        ts = tokens(go[start:j + 1])
        val, _ = parse_composite(ts, 0, None)
        if m.group(1):
            cases.extend(val if isinstance(val, list) else [val])
        else:
            cases.append(val)
    return cases

def case_json(c):
    req = c.get("Request", {})
    resp = c.get("Response", {})
    codes = list(resp.get("StatusCodes", []))
    if resp.get("StatusCode") and resp["StatusCode"] not in codes:
        codes.append(resp["StatusCode"])
    out = {"request": {k.lower(): v for k, v in req.items() if k in ("Host", "Method", "Path", "Headers", "Protocol")}}
    if c.get("TestCaseName"):
        out["name"] = c["TestCaseName"]
    out["status"] = codes or [200]
    if c.get("Backend"):
        out["backend"] = c["Backend"]
    if c.get("Namespace"):
        out["from_backend"] = True
    er = c.get("ExpectedRequest")
    if er:
        inner = er.get("Request", {})
        e = {k.lower(): v for k, v in inner.items() if k in ("Host", "Method", "Path", "Headers") and v not in ("", None)}
        if er.get("AbsentHeaders"):
            e["absent_headers"] = er["AbsentHeaders"]
        out["expected_request"] = e
    rr = c.get("RedirectRequest")
    if rr:
        out["redirect"] = {k.lower(): v for k, v in rr.items()}
    for src, dst in (("Headers", "response_headers"), ("ValidHeaderValues", "response_header_values"), ("AbsentHeaders", "response_absent_headers")):
        if resp.get(src):
            out[dst] = resp[src]
    if resp.get("IgnoreWhitespace"):
        out["ignore_whitespace"] = True
    if c.get("MirroredTo"):
        out["mirrored_to"] = [
            {"backend": m["BackendRef"]["Name"], **({"percent": m["Percent"]} if m.get("Percent") is not None else {})}
            for m in c["MirroredTo"]
        ]
    if c.get("BackendSetResponseHeaders"):
        out["backend_sets_response_headers"] = c["BackendSetResponseHeaders"]
    unknown = set(c) - {"Request", "Response", "Backend", "Namespace", "ExpectedRequest", "RedirectRequest", "TestCaseName", "BackendSetResponseHeaders", "MirroredTo"}
    unknown |= set(req) - {"Host", "Method", "Path", "Headers", "UnfollowRedirect", "Protocol"}
    if unknown:
        raise SystemExit(f"fields not converted: {unknown}")
    return out

def manifests(text):
    docs = [d for d in yaml.safe_load_all(text) if d]
    routes, gateways = [], []
    for d in docs:
        if d["kind"] == "HTTPRoute":
            spec = d["spec"]
            routes.append({
                "name": d["metadata"]["name"],
                "parentRefs": spec.get("parentRefs", []),
                "hostnames": spec.get("hostnames", []),
                "rules": spec.get("rules", []),
            })
        elif d["kind"] == "Gateway":
            gateways.append({"name": d["metadata"]["name"], "listeners": d["spec"]["listeners"]})
    return routes, gateways

def main():
    name, commit, checkout = sys.argv[1], sys.argv[2], sys.argv[3]
    go = open(f"{checkout}/conformance/tests/httproute-{name}.go").read()
    routes, gateways = manifests(open(f"{checkout}/conformance/tests/httproute-{name}.yaml").read())
    out = {
        "upstream": {
            "repository": "kubernetes-sigs/gateway-api",
            "commit": commit,
            "files": [f"conformance/tests/httproute-{name}.go", f"conformance/tests/httproute-{name}.yaml"],
            "license": "Apache-2.0; routes and cases are data converted from the files above",
        },
        "routes": routes,
    }
    if gateways:
        out["gateways"] = gateways
    out["cases"] = [case_json(c) for c in test_cases(go)]
    json.dump(out, sys.stdout, indent=1)
    print()

main()
