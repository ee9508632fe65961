"""Where the registry's endpoints come from: Kubernetes watches and self-registration."""
