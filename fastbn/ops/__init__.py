"""The op contract: autograd Functions (eager) and custom ops (torch.compile)."""
