"""`sprm serve --ray`: the server's app as Ray Serve replicas, through HTTP on 127.0.0.1: the contract (scores equal
to the engine's, errors, auth), and a replica killed under load (measured: failures in flight, none afterwards).
Skipped, visibly, without Ray."""

import socket
import threading
import time

import pytest

pytest.importorskip("ray", reason="the Ray tests need Ray (pip install 'ray[data,serve]')")
httpx = pytest.importorskip("httpx")

from sprm_kernels.model.engines.registry import load_engine  # noqa: E402
from sprm_kernels.model.ray import serve as ray_serve  # noqa: E402
from sprm_kernels.model.shipped import SHIPPED_DIR  # noqa: E402

SHIPPED = SHIPPED_DIR
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXT = "1+2+3=?<think>01+2=03 y.\n\n03+3=06 y.\n\n</think>6"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_local):
    """Two replicas of the shipped model behind Serve's proxy on 127.0.0.1, with a token."""
    url = ray_serve.deploy(SHIPPED, host="127.0.0.1", port=free_port(), options=ray_serve.ReplicaOptions(replicas=2),
                           max_queue=64, token=TOKEN)  # fmt: skip
    yield url
    ray_serve.undeploy()


def test_contract_through_the_proxy(served):
    engine = load_engine(SHIPPED, device="cpu")
    [expected] = engine.score([engine.encode([TEXT])[0]], return_all_scores=True)
    with httpx.Client(base_url=served, timeout=60) as client:
        health = client.get("/health", headers=AUTH)
        assert health.status_code == 200 and health.json()["engine"] == "hf"
        answer = client.post("/score", json={"text": TEXT, "return_all_scores": True}, headers=AUTH)
        assert answer.status_code == 200
        assert answer.json()["value"] == pytest.approx(expected.value, abs=1e-6)
        assert answer.json()["token_ids"] == expected.token_ids
        batch = client.post("/score_batch", json={"texts": [TEXT, TEXT]}, headers=AUTH).json()["results"]
        assert [r["value"] for r in batch] == pytest.approx([expected.value] * 2, abs=1e-6)
        # the server's errors, unchanged: auth first, then validation, then limits
        assert client.post("/score", json={"text": TEXT}).status_code == 401
        assert client.post("/score", json={"text": ""}, headers=AUTH).status_code == 422
        assert client.post("/score", content=b"{not json", headers={**AUTH, "content-type": "application/json"}
                           ).status_code == 400  # fmt: skip
        too_many = client.post("/score_batch", json={"texts": ["1"] * 65}, headers=AUTH)
        assert too_many.status_code == 413
        assert client.get("/health", headers=AUTH).status_code == 200  # still serving


def test_replica_killed_under_load(served):
    """4 clients score in a loop; one replica is killed mid-way. Requests in flight on it may fail (counted and
    printed); every request after Serve has noticed is answered. The test waits on the clients' own counts (a
    condition), never on a sleep: first 8 answers before the kill, then 40 requests after it."""
    import ray

    results, stop, counted = [], threading.Event(), threading.Condition()

    def client_loop():
        with httpx.Client(base_url=served, timeout=60) as client:
            while not stop.is_set():
                try:
                    code = client.post("/score", json={"text": TEXT}, headers=AUTH).status_code
                except httpx.HTTPError:
                    code = -1
                with counted:
                    results.append((time.monotonic(), code))
                    counted.notify_all()

    def wait_for(predicate, what: str) -> None:
        with counted:
            assert counted.wait_for(predicate, timeout=120), what

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: sum(code == 200 for _, code in results) >= 8, "the clients got no answers before the kill")
        names = ray_serve.replica_actor_names()
        assert len(names) == 2
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        wait_for(lambda: sum(t >= killed_at for t, _ in results) >= 40, "the clients stalled after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    before = [code for t, code in results if t < killed_at]
    during = [code for t, code in results if t >= killed_at]
    failed = [code for code in during if code != 200]
    print(f"\nreplica killed under load: {len(before)} requests before, {len(during)} after the kill, "
          f"{len(failed)} failed ({sorted(set(failed))})")  # fmt: skip
    assert before and all(code == 200 for code in before)
    assert len(failed) <= 4 + 4, "more failures than the requests one replica can hold in flight"  # 4 clients
    # after the in-flight ones, every request is answered (by the surviving replica, then by the replacement)
    with httpx.Client(base_url=served, timeout=60) as client:
        later = [client.post("/score", json={"text": TEXT}, headers=AUTH).status_code for _ in range(20)]
    assert later == [200] * 20
