"""fastpo's GPU session: the device checks as stages in order of value, each under a wall-clock cap.

    python -m bench.session run OUT [--only STAGE ...]   on a CUDA machine: model shapes, about 8 minutes in all
    python -m bench.session dry-run [OUT]               anywhere: the same stages and code at tiny shapes
    python -m bench.session plan [--dry-run]            what each stage would run, without running it
    python -m bench.session report OUT                  rewrite OUT/summary.md from the stage files

`bash bench/gpu_session.sh run OUT` installs the carried wheels and fastpo first, then calls `run`.

Stages (`runner.STAGES`), most valuable first, so that a lease cut short still returns the figures that
matter most:

    1 parity     compiled Triton kernels (head op fwd/bwd, pair-fused row kernels) against the references
    2 head       the LM head at N=8192, H=4096, V=128256: fastpo paths and baselines against the bare GEMMs
    3 dpo        the fused DPO loss against Liger's LigerFusedLinearDPOLoss and TRL's chunked head
    4 train      one DPO optimizer step of a ~0.5B model: prefix-shared fastpo against a TRL-style padded step
    5 attention  the prefix-shared attention backends on CUDA against separate forwards

Each stage runs in its own process (a crash or a hung kernel cannot take the session down) and is killed
at its cap; inside, cases check the deadline before they start, and the stage file is rewritten after
every case, so a stage that is cut keeps every case that finished and says that it was cut. A dry run
swaps the shapes for tiny ones (`plan(dry=True)` of each stage) and runs the same functions; on CPU the
Triton kernels run under TRITON_INTERPRET=1.

Output, at most 8 files (what a device call returns): `OUT/<n>-<stage>.json` per stage (meta: device,
versions, date, exact command; plan; status; rows; targets) and `OUT/summary.md` (every target measured
against its goal, then one section per stage), rewritten as each stage ends. `bench/gpu_session.sh` adds
`OUT/session.log`.
"""
