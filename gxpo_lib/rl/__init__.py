"""The RL loop around the rules: `trainer` (train, resume), rollouts (`sampling`, `lean_sampler`,
`vllm_sampler`), rewards (`rewards`, `grading`), `evaluation`, problems and data (`problems`, `arith_task`,
`benchmarks`), policies (`models`, `tiny_model`), the run folder's records (`runlog`, `tracking`) and the GPU
memory `preflight`."""
