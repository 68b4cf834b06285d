"""Plug-ins for any TorchRec model: FRE, FIE, injection, semantic tables, distillation."""
