"""The roles: one module per actor role (generator, learner and its backends, reference,
verifier pool), the driver's handles to them (fleet, learner group), weight sync, placement
and actor start-up."""
