"""Many clients at once against one cluster: every job gets exactly its own results."""

import threading

from burla import remote_parallel_map


def describe(x):
    return len(x) if isinstance(x, bytes) else x


def inputs_for(client):
    # mostly small values, with strings and some 100 KB blobs mixed in
    for i in range(10_000):
        if i % 100 == 7:
            yield bytes([client]) * 100_000
        elif i % 3 == 0:
            yield f"{client}-{i}"
        else:
            yield client * 100_000 + i


def expected_for(client):
    return [describe(x) for x in inputs_for(client)]


def test_twenty_concurrent_clients(cluster):
    results, errors = {}, []

    def client(n):
        try:
            results[n] = remote_parallel_map(describe, inputs_for(n), cluster=cluster.address, spinner=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((n, e))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert sorted(results) == list(range(20))
    for n in range(20):
        assert results[n] == expected_for(n), f"client {n}"
