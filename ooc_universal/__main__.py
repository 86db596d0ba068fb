from ooc_universal.cli.main import main

main()
