from ldfa_cli.cli.app import main

main()
