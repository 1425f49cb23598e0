"""Which experts live in fast memory: the utility estimator (routing -> expected tokens per
expert), the balancer (plan: greedy; ilp: the integer program), the policies (the runtime's and
the baselines), the costs of this machine, the page tier (pages, engine) and the controller that
ties them to the decode loop. It never imports the llama layer: it sees routing as arrays and
slots through residency.slots.SlotStore."""
