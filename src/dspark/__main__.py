from dspark.cli.main import main

main()
