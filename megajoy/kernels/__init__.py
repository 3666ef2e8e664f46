"""Hot-path ops. Each module holds a plain-torch reference; GPU fast paths sit behind the same function."""
