from meda.cli import main

main()
