"""The `letter` command line (click). The library never imports this package."""
