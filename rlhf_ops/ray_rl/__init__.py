"""The RL loop across Ray actor groups (`python -m rlhf_ops.cli.train_ppo_ray`).

This package adds placement, not a second algorithm: experience making, advantages, losses and
the loop itself are `rlhf_ops.rl` and `rlhf_ops.trainers.rl`; here the models live in Ray actors.

    placement.py  which roles share processes, one bundle per rank, fail fast when it cannot fit
    group.py      RoleGroup: N Ray actors of one group, their process group, calls and gathers
    worker.py     RoleWorker: one rank, holding the models of its roles
    driver.py     the driver's stand-ins for local models (RemoteModels, RemoteGenerator), RaySetup
    run.py        train_ppo_ray: connect to Ray, place and start the groups, run the loop, clean up

Ray itself is imported only inside these modules' functions, so `import rlhf_ops` stays light.
"""
