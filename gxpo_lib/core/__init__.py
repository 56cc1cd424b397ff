"""The update rules on plain tensors: GXPO's extrapolation (`extrapolation`, `flat_jump`, `reference`), the
shutoff gate (`gate`), the rules (`rules`: PlainStep and GXPO; `sfpo`), the GRPO losses (`losses`), the closure
every pass calls (`objective`) and the rules on FSDP2 shards (`distributed`). Nothing here knows about rollouts."""
