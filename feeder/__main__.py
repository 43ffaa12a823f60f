from feeder.cli import cli

cli()
