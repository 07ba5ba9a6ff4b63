"""Integrations: TensorBoard sink and Lightning callback (imported lazily by the user)."""
