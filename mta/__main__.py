from mta.cli import main

main()
