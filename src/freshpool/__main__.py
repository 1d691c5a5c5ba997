from freshpool.cli import main

main()
