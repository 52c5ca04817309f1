"""Helpers shared by every genzoo script: one small module per concern (cli, data, ema, ckpt, grid, tracking)."""
