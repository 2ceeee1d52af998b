"""Stopped trials give their GPUs back even without Ray's dashboard (real local Ray, no mocks)."""

import pytest


@pytest.fixture(scope="module")
def ray_without_dashboard():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False)  # never an existing cluster
    yield ray
    ray.shutdown()


def test_reaper_removes_only_the_groups_of_dead_actors(ray_without_dashboard):
    ray = ray_without_dashboard
    from ray.util.placement_group import placement_group, placement_group_table

    from tuner.tune.cleanup import reap

    class Reserver:
        def reserve(self):
            pg = placement_group([{"CPU": 1}])
            ray.get(pg.ready())
            return pg.id.hex()

    TrainController = type("TrainController", (Reserver,), {})  # the name of Ray Train's controller
    controller, other = ray.remote(num_cpus=0)(TrainController), ray.remote(num_cpus=0)(Reserver)

    dead, alive, dead_other = controller.remote(), controller.remote(), other.remote()
    dead_pg, alive_pg, other_pg = (ray.get(a.reserve.remote()) for a in (dead, alive, dead_other))
    driver_pg = placement_group([{"CPU": 1}])  # a driver's own group (Tune's, a user's)
    ray.get(driver_pg.ready())
    assert ray.available_resources().get("CPU", 0) == 0
    ray.kill(dead)
    ray.kill(dead_other)
    import time

    time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == 0  # the dead actors' CPUs are still reserved
    assert reap() == 1
    state = {pg_id: info["state"] for pg_id, info in placement_group_table().items()}
    # only the dead controller's group goes; a live controller's and another actor's stay
    assert state[dead_pg] == "REMOVED" and state[alive_pg] == "CREATED" and state[other_pg] == "CREATED"
    assert state[driver_pg.id.hex()] == "CREATED"
    deadline = time.time() + 10
    while ray.available_resources().get("CPU", 0) < 1 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 1  # given back
    assert reap() == 0
