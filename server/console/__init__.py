"""The web console's static files (HTML, CSS, plain JS modules: no build step) and
`assets.ConsoleAssets`, which loads them once and names their versioned URLs."""
